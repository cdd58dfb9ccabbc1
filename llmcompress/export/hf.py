"""``format: hf``: a folder that ``AutoModelForCausalLM.from_pretrained`` loads as is.

bnb, gptq (with gptqmodel + optimum), torchao int8, compressed-tensors (llmc-*) and dense (or pruned) folders are
such folders and are copied. rtn, hqq and CPU torchao-int4wo save llmcompress's own layout, which plain
``from_pretrained`` cannot rebuild: exporting them needs either ``dequantize: true`` (dense weights, loads anywhere,
no size saving) or another format (``compressed-tensors`` holds rtn's numbers exactly, packed). We never dequantize
silently: a user who asked for a 4-bit model must not get a 16-bit one without saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from .base import LAYOUT_KEYS, OWN_LAYOUT_METHODS, Exporter, copy_folder, dense_copy, method_of, write_meta

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageConfig
    from .stage import ExportStage


def _own_layout_fix(method: str) -> str:
    other = "`format: compressed-tensors` (the same int numbers, packed; transformers and vLLM load it)" \
        if method == "rtn" else "`format: gguf`"
    return (f"`{method}` saves llmcompress's own layout, which plain `from_pretrained` cannot load. "
            f"Fix: set `dequantize: true` (dense weights: loads anywhere, no size saving) or use {other}.")


class HFExporter(Exporter):
    consumer = "transformers AutoModelForCausalLM.from_pretrained"

    def check(self, stage: "ExportStage", quantize: "StageConfig | None") -> str | None:
        method = method_of(quantize)
        if method in OWN_LAYOUT_METHODS and not stage.dequantize:
            return _own_layout_fix(method)
        return None

    def export(self, stage: "ExportStage", ctx: "RunContext", out: Path) -> dict[str, Any]:
        meta = dict(ctx.current.meta)
        fmt = meta.get("format", "hf")
        method = meta.get("method")
        if stage.dequantize:
            from ..models.loading import save_model, storage_dtype_of

            dense, tokenizer = dense_copy(ctx)
            storage = storage_dtype_of(ctx.original.path) or "bfloat16"
            export = {"format": "hf", "from": str(ctx.current.path), "dequantized": True, "storage_dtype": storage}
            keep = {k: v for k, v in meta.items() if k not in ("format", "versions", *LAYOUT_KEYS)}
            save_model(dense, tokenizer, out, {**keep, "export": export}, storage_dtype=storage)
            caveats = [f"Dequantized: the {method or 'model'}'s weights are stored dense in {storage} (each weight "
                       f"rounded to {storage}); the folder is about as large as the original."]
            return {"files": sorted(p.name for p in out.iterdir()), "dequantized": True, "caveats": caveats}
        if not _from_pretrained_loads(meta):
            raise RecipeError(_own_layout_fix(method or fmt))
        files = copy_folder(ctx.current.path, out)
        write_meta(out, meta, {"format": "hf", "from": str(ctx.current.path)})
        return {"files": files, "dequantized": False, "caveats": _caveats(out)}


def _from_pretrained_loads(meta: dict) -> bool:
    """Folders in transformers' own format: ours say ``format: hf``; torchao's say which layout they hold."""
    fmt = meta.get("format", "hf")
    torchao_hf = fmt == "torchao" and (meta.get("torchao") or {}).get("layout") == "hf"
    return fmt in ("hf", "compressed-tensors") or torchao_hf


def _caveats(folder: Path) -> list[str]:
    from .base import read_config

    qc = read_config(folder).get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gptq":
        return ["Loading in transformers needs `gptqmodel` and `optimum` installed; vLLM reads the same GPTQ folder "
                "(not tested here)."]
    if method == "bitsandbytes":
        return ["Loading needs `bitsandbytes`; on CPU bnb saves memory, not time."]
    if method == "torchao":
        return ["Loading needs `torchao` (the version in llmcompress.json)."]
    if method == "compressed-tensors":
        return ["transformers on CPU decompresses compressed-tensors weights to dense layers when loading (no memory "
                "saving in memory); vLLM runs them packed."]
    return []
