"""Turn a resolved ModelSource into a local dense folder (what the pipeline calls the original model)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMCompressError
from . import MODELS, ModelSource
from .gguf import dense_from_gguf


def check_source(source: ModelSource) -> None:
    """Cheap checks before anything loads: a hub model needs the hub."""
    if source.kind == "hub":
        from ..utils.net import hub_reachable

        if not hub_reachable():
            raise LLMCompressError(
                f"model: `{source.ref}` is a hub id, but the Hugging Face hub is not reachable from here (offline). "
                "Fix: use a local `save_pretrained` folder, a .gguf file, or a builtin model "
                f"({', '.join(MODELS.names())})."
            )


def materialize(source: ModelSource) -> Path:
    """A local folder holding the original model (built once and cached for builtin and GGUF models)."""
    if source.kind == "builtin":
        return Path(MODELS.get(source.ref)())
    if source.kind == "gguf":
        return dense_from_gguf(Path(source.ref))
    if source.kind == "folder":
        path = Path(source.ref)
        if source.spec.gguf_file:
            return dense_from_gguf(path / source.spec.gguf_file)
        return path
    check_source(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source.ref, revision=source.spec.revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
            )
        )
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
        raise LLMCompressError(f"model: could not download `{source.ref}` from the hub: {e}") from None
