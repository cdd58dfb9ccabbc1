"""What kind of model a recipe names, decided from its config.json alone (no weights, no torch).

- ``vision``: an image classifier (``*ForImageClassification``, timm models through ``TimmWrapper``) or an object
  detector (``*ForObjectDetection``: DETR, YOLOS, ...).
- ``vlm``: a vision-language model (a config with both ``vision_config`` and ``text_config``, e.g. Llava, Idefics3):
  the LLM stages run on its language part, the vision tower stays dense.
- ``llm``: everything else (causal LMs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..utils.io import read_config, read_json

if TYPE_CHECKING:
    from ..recipe import Recipe

#: transformers' auto class per (kind, task).
AUTO_CLASSES = {
    ("vision", "image-classification"): "AutoModelForImageClassification",
    ("vision", "object-detection"): "AutoModelForObjectDetection",
    ("vlm", None): "AutoModelForImageTextToText",
    ("llm", None): "AutoModelForCausalLM",
}
#: Module names (regexes) of a VLM that the LLM stages leave alone: the vision encoder and the projector into the
#: language model. Names as transformers 5 spells them for Llava, LlavaNext, Idefics3/SmolVLM, Qwen2-VL, Gemma 3.
VLM_VISION_MODULES = (r"(.*\.)?vision_tower(\..*)?", r"(.*\.)?vision_model(\..*)?", r"(.*\.)?visual(\..*)?",
                      r"(.*\.)?multi_modal_projector(\..*)?", r"(.*\.)?connector(\..*)?")


def kind_of_config(conf: dict) -> tuple[str, str | None]:
    """``(kind, task)`` of a config.json dict."""
    for arch in conf.get("architectures") or []:
        if arch.endswith("ForImageClassification"):
            return "vision", "image-classification"
        if arch.endswith("ForObjectDetection"):
            return "vision", "object-detection"
    if "vision_config" in conf and "text_config" in conf:
        return "vlm", None
    return "llm", None


def folder_kind(path: str | Path) -> tuple[str, str | None]:
    """``(kind, task)`` of a model folder: its llmcompress.json says, else its config.json (a folder without either,
    or a file, counts as an LLM: the loaders report what is missing). LLMCompressError when a file is not valid JSON."""
    path = Path(path)
    conf = path / "config.json"
    kind, task = kind_of_config(read_config(conf)) if conf.is_file() else ("llm", None)
    meta = path / "llmcompress.json"
    if meta.is_file():
        m = read_config(meta)
        if m.get("kind") and m["kind"] != kind:  # an explicit `kind:` the folder was made with
            return m["kind"], m.get("task") or task
    return kind, task


def auto_class_name(kind: str, task: str | None) -> str:
    return AUTO_CLASSES[(kind, task if kind == "vision" else None)]


def auto_model_class(path_or_config: Any):
    """The transformers auto class that loads a folder (or a config object / dict) of any kind."""
    import transformers

    if isinstance(path_or_config, (str, Path)):
        kind, task = folder_kind(path_or_config)
    else:
        conf = path_or_config if isinstance(path_or_config, dict) else path_or_config.to_dict()
        kind, task = kind_of_config(conf)
    return getattr(transformers, auto_class_name(kind, task))


def spec_kind(recipe: "Recipe") -> tuple[str | None, str | None]:
    """``(kind, task)`` the recipe's model has, from what can be read without the hub: the explicit ``kind:``, a
    builtin's registry entry, a ``timm:`` source, a local folder's config.json. ``(None, None)`` = not known yet
    (a hub id without ``kind:``; the pipeline's preflight reads its config.json when the hub is reachable)."""
    from . import VISION_BUILTINS

    spec = recipe.model
    detected: tuple[str | None, str | None] = (None, None)
    if spec.source in VISION_BUILTINS:
        detected = ("vision", VISION_BUILTINS[spec.source][0])
    else:
        path = recipe.resolve_path(spec.source)
        if path.is_dir() and (path / "config.json").is_file():
            from .timm import check_timm

            check_timm(spec.source, path / "config.json")
            detected = folder_kind(path)
        elif _is_builtin(spec.source):
            detected = ("llm", None)
    return _reconcile(spec, detected)


def hub_kind(recipe: "Recipe") -> tuple[str | None, str | None]:
    """``(kind, task)`` of a hub model from its config.json (one small download); ``(None, None)`` when unreadable."""
    spec = recipe.model
    try:
        from huggingface_hub import hf_hub_download

        conf = read_json(Path(hf_hub_download(spec.source, "config.json", revision=spec.revision)))
    except Exception:  # noqa: BLE001 - no config.json (GGUF repos), or the hub failed: the loader says more later
        return _reconcile(spec, (None, None))
    from .timm import check_timm

    check_timm(spec.source, None, conf)
    return _reconcile(spec, kind_of_config(conf))


def _is_builtin(name: str) -> bool:
    from ..models import MODELS

    return name in MODELS


def _reconcile(spec: Any, detected: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    """The explicit ``kind``/``task`` of ``model:`` checked against what the config says."""
    kind, task = detected
    if spec.kind != "auto":
        if kind is not None and kind != spec.kind:
            raise RecipeError(
                f"model: `kind: {spec.kind}`, but `{spec.source}` is a {_kind_words(kind, task)} model by its "
                f"config.json. Fix: set `kind: {kind}` (or `auto`), or point `source` at a {spec.kind} model."
            )
        kind = spec.kind
    if spec.task is not None:
        if kind not in (None, "vision"):
            raise RecipeError(f"model: `task: {spec.task}` applies to `kind: vision` models, and `{spec.source}` is "
                              f"a {_kind_words(kind, None)} model. Fix: remove `task`.")
        if task is not None and task != spec.task:
            raise RecipeError(f"model: `task: {spec.task}`, but `{spec.source}` is an {task} model by its "
                              f"config.json. Fix: set `task: {task}` or remove it.")
        task = spec.task
    return kind, task


def _kind_words(kind: str | None, task: str | None) -> str:
    return {"vision": f"vision ({task or 'image'})", "vlm": "vision-language", "llm": "causal language"}.get(
        kind or "", "unknown")
