"""Turn a resolved ModelSource into a local dense folder (what the pipeline calls the original model)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMCompressError
from ..utils.tensorfile import safetensors_header
from . import MODELS, ModelSource
from .gguf import dense_from_gguf


def check_source(source: ModelSource) -> None:
    """Cheap checks before anything loads: a hub model needs the hub; a folder's weight files are whole."""
    if source.kind == "folder" and not source.spec.gguf_file:
        check_folder(Path(source.ref))
    if source.kind == "gguf" or (source.kind == "folder" and source.spec.gguf_file):
        from .gguf import check_readable

        check_readable(Path(source.ref) / (source.spec.gguf_file or ""))
    if source.kind == "hub":
        from ..utils.net import hub_endpoint, hub_offline, hub_reachable

        if hub_reachable() or _cached(source) is not None:
            return
        why = ("HF_HUB_OFFLINE is set, and it is not in the local Hugging Face cache"
               if hub_offline() else f"the hub ({hub_endpoint()}) is not reachable from here, and it is not in the "
               "local Hugging Face cache")
        raise LLMCompressError(
            f"model: `{source.ref}` is a hub id, but {why}. Fix: download it once with the network on (unset "
            "HF_HUB_OFFLINE; HF_ENDPOINT and HTTPS_PROXY are honoured), or use a local `save_pretrained` folder, a "
            f".gguf file, or a builtin model ({', '.join(MODELS.names())})."
        )


#: The files of a hub model a run needs (the same patterns offline: the cache is complete for them or not at all).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _cached(source: ModelSource) -> Path | None:
    """The local HF cache's complete snapshot of a hub model, or None (no network used)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.ref, revision=source.spec.revision, allow_patterns=_HUB_FILES,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or partly): the caller says what to do
        return None


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
    return _download(source)


def _download(source: ModelSource) -> Path:
    """snapshot_download of the model (its progress bars shown), from the cache alone when the hub is off or
    unreachable; plus the original's README.md when it has one (its license goes on our model card)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from ..utils.liblogs import tqdm_shown
    from ..utils.net import hub_endpoint, hub_reachable

    local = not hub_reachable()
    try:
        with tqdm_shown():
            path = Path(snapshot_download(source.ref, revision=source.spec.revision, allow_patterns=_HUB_FILES,
                                          local_files_only=local))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
        raise LLMCompressError(f"model: could not download `{source.ref}` from the hub ({hub_endpoint()}): "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. Fix: "
                               "check the id, the revision and your token (HF_TOKEN) for a private or gated "
                               "model.") from None
    try:
        hf_hub_download(source.ref, "README.md", revision=source.spec.revision, local_files_only=local)
    except Exception:  # noqa: BLE001 - no card, or not cached: the card then names no license
        pass
    return path


#: config.json sizes every loader reads as positive integers (checked without importing transformers).
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings")


_FIX = "Fix: copy or save the model again (save_pretrained), or point `model:` at another folder."


def check_folder(folder: Path) -> None:
    """A model folder's config.json names a model, the shards its index lists are there, and every weights file is
    whole: a damaged folder fails here, naming the file, before anything loads."""
    from ..utils.io import read_config

    config = read_config(Path(folder) / "config.json")
    if not config.get("model_type") and not config.get("architectures"):
        raise LLMCompressError(f"model: config.json of `{folder}` names no `model_type` or `architectures`, so no "
                               f"loader can build the model. {_FIX}")
    bad = [k for k in _SIZES if k in config and (type(config[k]) is not int or config[k] < 1)]
    if bad:
        raise LLMCompressError(f"model: config.json of `{folder}`: {', '.join(f'`{k}` = {config[k]!r}' for k in bad)} "
                               f"must be a positive integer. {_FIX}")
    for index in sorted(Path(folder).glob("*.safetensors.index.json")):
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LLMCompressError(f"model: `{index}` has no `weight_map`. {_FIX}")
        missing = sorted({str(f) for f in weight_map.values() if not (Path(folder) / str(f)).is_file()})
        if missing:
            raise LLMCompressError(f"model: `{index}` lists {len(missing)} weights file(s) that are not in "
                                   f"`{folder}`: {', '.join(missing[:3])}. {_FIX}")
    check_weights(folder)


def check_weights(folder: Path) -> None:
    """Every ``*.safetensors`` file of ``folder`` has a readable header and is as long as the header says (a
    truncated download or copy fails here, with the file named, instead of deep inside ``from_pretrained``)."""
    import struct

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            size = f.stat().st_size
            n, header = safetensors_header(f)
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, struct.error) as e:
            raise LLMCompressError(f"model: `{f}` is not a readable safetensors file "
                                   f"({getattr(e, 'strerror', None) or e}). {_FIX}") from None
        need = 8 + n + max(ends, default=0)
        if size < need:
            raise LLMCompressError(f"model: `{f}` is truncated: {size:,} bytes, and its header says {need:,}. {_FIX}")
