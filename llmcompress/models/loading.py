"""Load and save models. Every folder we write carries ``llmcompress.json`` (format, method, config, versions),
so a folder alone tells how it was made and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LLMCompressError
from ..registry import Registry
from ..utils.io import atomic_write_json, read_json

META = "llmcompress.json"

#: Saved-folder formats -> loader(path, device, dtype) -> model. "hf" covers dense and bnb/gptq folders that
#: transformers loads by itself; methods with their own layout register theirs.
FORMATS: Registry = Registry("saved model format")
FORMATS.register_lazy("hf", "llmcompress.models.loading:_load_hf")
FORMATS.register_lazy("rtn", "llmcompress.quant.rtn:load_rtn")
FORMATS.register_lazy("hqq", "llmcompress.quant.hqq:load_hqq")
FORMATS.register_lazy("torchao", "llmcompress.quant.torchao:load_torchao")


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _load_hf(path: str | Path, device: str, dtype: str, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype), **kwargs)
    if device != "cpu" and getattr(model, "hf_quantizer", None) is None:
        model = model.to(device)
    return model.eval()


def read_meta(path: Path) -> dict:
    f = Path(path) / META
    return read_json(f) if f.is_file() else {"format": "hf"}


def load_model(path: str | Path, device: str = "cpu", dtype: str = "bfloat16", **kwargs: Any):
    """Load a model folder we (or anyone, via ``save_pretrained``) wrote. Returns ``(model, tokenizer)``."""
    from transformers import AutoTokenizer

    meta = read_meta(Path(path)) if Path(path).is_dir() else {"format": "hf"}
    loader = FORMATS.get(meta.get("format", "hf"))
    try:
        model = loader(path, device=device, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=kwargs.get("revision"))
    except OSError as e:
        raise LLMCompressError(f"could not load model `{path}`: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_model(model, tokenizer, path: Path, meta: dict) -> None:
    """``save_pretrained`` plus our metadata. Call inside ``atomic_dir`` so a killed save leaves nothing behind."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    atomic_write_json(path / META, {"format": "hf", **meta, "versions": versions()})


def versions() -> dict[str, str]:
    """Versions of the packages that shape a result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llmcompress", "torch", "transformers", "bitsandbytes", "lm-eval", "peft", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def param_bytes(model) -> int:
    """Bytes held by parameters and buffers (quantized weights count at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
