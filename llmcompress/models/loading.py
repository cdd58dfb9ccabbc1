"""Load and save models. Every folder we write carries ``llmcompress.json`` (format, method, config, versions),
so a folder alone tells how it was made and how to load it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LLMCompressError
from ..registry import Registry
from ..utils.io import atomic_write_json, read_config, read_json

META = "llmcompress.json"

#: Saved-folder formats -> loader(path, device, dtype) -> model. "hf" covers dense and bnb/gptq folders that
#: transformers loads by itself; methods with their own layout register theirs.
FORMATS: Registry = Registry("saved model format")
FORMATS.register_lazy("hf", "llmcompress.models.loading:_load_hf")
FORMATS.register_lazy("rtn", "llmcompress.quant.rtn:load_rtn")
FORMATS.register_lazy("hqq", "llmcompress.quant.hqq:load_hqq")
FORMATS.register_lazy("torchao", "llmcompress.quant.torchao:load_torchao")
FORMATS.register_lazy("peft", "llmcompress.lora.merge:load_peft")  # base folder + LoRA adapter, not merged
FORMATS.register_lazy("compressed-tensors", "llmcompress.quant.llmcompressor:load_compressed_tensors")
FORMATS.register_lazy("dynamic-int8", "llmcompress.quant.dynamic:load_dynamic_int8")
FORMATS.register_lazy("gguf", "llmcompress.llamacpp.model:load_gguf")  # model.gguf run by llama.cpp
FORMATS.register_lazy("structured", "llmcompress.models.skeleton:load_structured")  # MLP channels removed
FORMATS.register_lazy("lowrank", "llmcompress.prune.lowrank:load_lowrank")  # low-rank factorized pairs
FORMATS.register_lazy("codebook", "llmcompress.quant.codebook:load_codebook")


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _load_hf(path: str | Path, device: str, dtype: str, **kwargs: Any):
    from .family import auto_model_class  # AutoModelForCausalLM, or the class of the folder's family

    model = auto_model_class(path).from_pretrained(str(path), dtype=torch_dtype(dtype), **kwargs)
    if device != "cpu" and getattr(model, "hf_quantizer", None) is None:
        model = model.to(device)
    return model.eval()


def to_model_keys(model: Any, state: dict) -> dict:
    """A state dict read from safetensors, renamed to the model's module names: transformers 5 saves some models
    (Llava and other VLMs) under their legacy checkpoint names and renames them only inside ``from_pretrained``."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # older transformers: saved names are module names
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return state
    return {rename_source_key(k, renamings, [])[0]: v for k, v in state.items()}


def read_meta(path: Path) -> dict:
    f = Path(path) / META
    return read_json(f) if f.is_file() else {"format": "hf"}


def load_model(path: str | Path, device: str = "cpu", dtype: str = "bfloat16", **kwargs: Any):
    """Load a model folder we (or anyone, via ``save_pretrained``) wrote. Returns ``(model, tokenizer)``."""
    from ..utils.envguard import import_tokenicer_cleanly
    from .family import family_of_folder

    import_tokenicer_cleanly()  # transformers imports gptqmodel for GPTQ folders, and peft for adapters
    loaded = family_of_folder(path).load(path, device, dtype, **kwargs)  # vision: (model, image processor)
    model, tokenizer = loaded if loaded is not None else load_text_model(path, device, dtype, **kwargs)
    keep_bnb_cpu_packing_to_packable_(model)
    _forget_own_layout(model)
    return model, tokenizer


def load_text_model(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """``(model, tokenizer)`` of a language model folder in any saved format (``FORMATS``): the LLM family's loader."""
    from transformers import AutoTokenizer

    meta = read_meta(Path(path)) if Path(path).is_dir() else {"format": "hf"}
    loader = FORMATS.get(meta.get("format", "hf"))
    try:
        model = loader(path, device=device, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=kwargs.get("revision"))
    except OSError as e:
        raise LLMCompressError(f"could not load model `{path}`: {e}") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' own type: a damaged or truncated weights file
            raise
        raise LLMCompressError(f"could not load model `{path}`: a weights file is damaged or truncated ({e}). "
                               "Fix: save or copy the model again, or re-run the stage that wrote it.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def bnb_cannot_repack(module: Any) -> bool:
    """A ``Linear4bit`` whose shape bnb's AVX512-BF16 repacking fails on (bitsandbytes 0.50.2: the first forward
    on such a CPU repacks the weight, ``shape '[N, 0]' is invalid`` for these shapes; see quant/bnb.py)."""
    if type(module).__name__ != "Linear4bit":
        return False
    blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
    return bool(module.in_features % blocksize or module.out_features % 32)


def keep_bnb_cpu_packing_to_packable_(model: Any) -> Any:
    """Turn bnb's AVX512-BF16 weight repacking off for the ``Linear4bit`` layers it cannot repack; the model."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False) and bnb_cannot_repack(m):
            m.support_avx512bf16_for_cpu = False
    return model


def save_model(model, tokenizer, path: Path, meta: dict, storage_dtype: str | None = None) -> None:
    """``save_pretrained`` plus our metadata. Call inside ``atomic_dir`` so a killed save leaves nothing behind.

    ``storage_dtype``: write the model's unquantized floating tensors (embeddings, norms, skipped layers, scales) in
    this dtype — the original's on-disk dtype — so a model run in fp32 is not saved, and sized, at twice its bf16 size.
    The in-memory model keeps the values it would have after a reload.
    """
    path = Path(path)
    with _stored_as(model, storage_dtype):
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_meta(path, meta)
    if meta.get("format", "hf") not in PLAIN_FORMATS:
        mark_own_layout(path, meta["format"])


#: ``quantization_config`` key of a folder in one of our own layouts (rtn with Conv2d layers, hqq, torchao int4 on
#: CPU, dynamic-int8). transformers refuses a ``quantization_config`` without ``quant_method`` ("has no
#: `quant_method` attribute"), so plain ``from_pretrained`` fails on such a folder instead of loading it with every
#: quantized layer missing and re-initialized at random (which it did: only newlines came out).
OWN_LAYOUT_KEY = "llmcompress_format"
#: formats whose folders other tools load as they are (structured is not one: its layers have their own widths)
PLAIN_FORMATS = ("hf", "compressed-tensors", "peft", "gguf")
#: why plain ``from_pretrained`` cannot load a format, where "its quantized layers would stay random" is not it
_OWN_LAYOUT_WHY = {"structured": "`structured` pruning gave layers their own widths (channels removed), which a "
                                 "transformers config cannot say; llmcompress rebuilds each layer at its saved shape"}


def mark_own_layout(path: Path, fmt: str) -> None:
    """Make plain ``from_pretrained`` refuse ``path`` (see OWN_LAYOUT_KEY), unless its config.json already holds a
    transformers serialization (``quant_method``), which loads."""
    from ..utils.io import read_json

    cfg_file = Path(path) / "config.json"
    config = read_json(cfg_file)
    if (config.get("quantization_config") or {}).get("quant_method"):
        return
    config["quantization_config"] = {
        OWN_LAYOUT_KEY: fmt,
        "load_with": "llmcompress: `from llmcompress.models.loading import load_model; load_model(folder)`",
        "why": _OWN_LAYOUT_WHY.get(fmt, f"`{fmt}` is llmcompress's own layout; transformers alone would leave its "
                                        "quantized layers random"),
    }
    atomic_write_json(cfg_file, config)


def _forget_own_layout(model: Any) -> None:
    """A model loaded from an own-layout folder: drop the marker from its in-memory config, so that saving it in
    another form (dense, merged) does not carry the refusal along."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict) and OWN_LAYOUT_KEY in qc:
        del config.quantization_config


def write_meta(path: Path, meta: dict) -> None:
    """The folder's ``llmcompress.json``: format ``hf`` unless ``meta`` says otherwise, and the package versions."""
    atomic_write_json(Path(path) / META, {"format": "hf", **meta, "versions": versions()})


@contextmanager
def _stored_as(model, dtype_name: str | None):
    import torch

    if dtype_name is None:
        yield
        return
    target = torch_dtype(dtype_name)
    changed = []
    # Only the parameters of plain layers (embeddings, norms, unquantized Linear): quantized layers keep their own
    # fp32 internals (bnb absmax/SCB, scales), and non-persistent buffers (rotary inv_freq) are recomputed on load.
    plain = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
    for module in model.modules():
        if type(module) not in plain and not type(module).__name__.endswith("RMSNorm"):
            continue
        for t in module.parameters(recurse=False):
            if type(t.data) is not torch.Tensor:  # a quantized tensor subclass (torchao) stores its own parts
                continue
            if t.dtype == torch.float32 and target != torch.float32:
                t.data = t.data.to(target)
                changed.append(t)
    old_cfg = getattr(model.config, "dtype", None)
    model.config.dtype = target if changed else old_cfg
    try:
        yield
    finally:
        for t in changed:  # round-tripped through the storage dtype: exactly what a reload will see
            t.data = t.data.to(torch.float32)
        model.config.dtype = old_cfg


def storage_dtype_of(folder: Path) -> str | None:
    """The dtype a model folder stores its weights in (config.json), if it is one we can cast to."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    conf = read_config(cfg)
    name = conf.get("dtype") or conf.get("torch_dtype")
    return name if name in ("bfloat16", "float16", "float32") else None


CORE_PACKAGES = ("llmcompress", "torch", "transformers", "bitsandbytes", "lm-eval", "peft", "gguf")
METHOD_PACKAGES = ("gptqmodel", "optimum", "hqq", "torchao", "llmcompressor", "compressed-tensors")


def versions(methods: bool = True) -> dict[str, str]:
    """Versions of the installed packages that shape a result (``methods=False``: the core ones only)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in CORE_PACKAGES + (METHOD_PACKAGES if methods else ()):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def param_bytes(model) -> int:
    """Bytes the weights hold in memory: parameters and buffers (quantized weights at their packed size), plus what
    quantized layers keep outside them (HQQLinear's scale/zero in ``meta``, dynamic int8's packed weights)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        tensors += _tensors_outside_parameters(m)
    for t in tensors:
        for part in _stored_parts(t.data):
            if part.data_ptr() in seen:
                continue
            seen.add(part.data_ptr())
            total += part.numel() * part.element_size()
    return total


def _tensors_outside_parameters(module) -> list:
    """Tensors a quantized layer holds as plain attributes (by class name: no import of hqq or torch.ao here)."""
    import torch

    kind = type(module).__name__
    if kind == "HQQLinear":  # W_q is a Parameter; scale, zero (and a plain-tensor bias) are attributes
        extra = [v for v in (getattr(module, "meta", None) or {}).values() if isinstance(v, torch.Tensor)]
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and not isinstance(bias, torch.nn.Parameter):
            extra.append(bias)
        return extra
    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # packed int8 weight + per-channel qparams
        weight, bias = module._packed_params._weight_bias()
        extra = [weight.int_repr()]
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra += [weight.q_per_channel_scales(), weight.q_per_channel_zero_points()]
        return extra + ([bias] if bias is not None else [])
    return []


def _stored_parts(t):
    """The plain tensors that hold ``t``'s data: a tensor subclass (torchao's Int8Tensor, Int4OpaqueTensor, ...) has
    no storage of its own (``data_ptr()`` is 0 for every one of them) but inner tensors (qdata, scales)."""
    import torch

    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _stored_parts(getattr(t, name))
    else:
        yield t
