"""Where models come from: builtin names, HF hub ids, local folders and GGUF files, all resolved to a dense folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RecipeError
from ..registry import Registry, did_you_mean
from ..vision import VISION_BUILTINS

if TYPE_CHECKING:
    from .spec import ModelSpec

#: Builtin models: name -> function returning a dense HF folder (built and cached on first use).
MODELS: Registry = Registry("builtin model")
MODELS.register_lazy("smollm2-135m", "llmcompress.models.builtin:smollm2_135m")
MODELS.register_lazy("tiny-random-llama", "llmcompress.models.tiny:tiny_random_llama")
for _name, (_task, _target) in VISION_BUILTINS.items():  # digits-convnext, ...: trained here, cached
    MODELS.register_lazy(_name, _target)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference. ``kind`` is builtin | folder | gguf | hub."""

    kind: str
    ref: str
    spec: "ModelSpec"

    def describe(self) -> str:
        return f"{self.kind}:{self.ref}"


def check_gguf(path: Path) -> None:
    """A file named .gguf is a GGUF file (magic ``GGUF``), checked before anything tries to parse it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise RecipeError(f"model: `{path}` cannot be read ({e.strerror}). Fix: check its permissions.") from None
    if head != b"GGUF":
        raise RecipeError(f"model: `{path}` is not a GGUF file (it starts with {head!r}, not b'GGUF'). Fix: point "
                          "`model:` at a .gguf file written by llama.cpp's converter, or at a save_pretrained folder.")


def resolve_source(spec: "ModelSpec", base_dir: Path) -> ModelSource:
    """Decide what ``model:`` names, without loading anything. Raises RecipeError with did-you-mean."""
    s = spec.source
    if s in MODELS:
        if spec.gguf_file:
            raise RecipeError(f"model: `gguf_file: {spec.gguf_file}` names a file inside a folder or hub repo, and "
                              f"`{s}` is a builtin model. Fix: remove `gguf_file`, or set `source:` to the folder.")
        return ModelSource("builtin", s, spec)
    path = Path(s).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if s.endswith(".gguf"):
        if not path.is_file():
            raise RecipeError(
                f"model: GGUF file `{path}` does not exist. Fix: check the path (relative to the recipe)."
            )
        check_gguf(path)
        return ModelSource("gguf", str(path.resolve()), spec)
    if path.is_dir():
        if not (path / "config.json").is_file() and not spec.gguf_file:
            raise RecipeError(
                f"model: folder `{path}` has no config.json. Fix: point to a `save_pretrained` folder, "
                "or name a GGUF file with `gguf_file:`."
            )
        if spec.gguf_file:
            if not (path / spec.gguf_file).is_file():
                raise RecipeError(f"model: `gguf_file: {spec.gguf_file}` is not a file in `{path}`. Fix: check the "
                                  "name.")
            check_gguf(path / spec.gguf_file)
        return ModelSource("folder", str(path.resolve()), spec)
    looks_like_path = s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith(("/", ".safetensors", ".bin"))
    if _HUB_ID.match(s) and not looks_like_path:
        return ModelSource("hub", s, spec)
    raise RecipeError(
        f"model: `{s}` is not a builtin model, an existing folder or file, or a hub id (org/name)."
        f"{did_you_mean(s, MODELS.names())} Builtin models: {', '.join(MODELS.names())}."
    )
