"""The export stage on a vision model: ``format: hf``, a folder the task's ``AutoModelFor...`` loads as is.

Dense, magnitude-pruned, bnb and torchao int8 folders are copied; rtn, hqq, torchao int4 (CPU) and dynamic int8
save llmcompress's own layout, so exporting them takes ``dequantize: true`` (every quantized Linear and Conv2d
written dense: loads anywhere, no size saving). The export is reloaded in a fresh process with
``transformers.AutoModelFor<task>.from_pretrained`` and its logits compared with the run's model on 8 digit images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageResult


def run_export(stage: Any, ctx: "RunContext") -> "StageResult":
    from ..export.card import write_card
    from ..export.stage import CARD, ctx_report
    from ..stage import StageResult
    from ..utils.io import atomic_dir, folder_size

    if stage.format != "hf":
        raise RecipeError(f"`format: {stage.format}` does not hold a vision model. Fix: use `format: hf`.")
    task = ctx.model_task
    cls = ctx.family.auto_class(task)
    out = stage._target(ctx)
    t0 = time.perf_counter()
    with ctx.task("export hf"), atomic_dir(out) as tmp:
        info = export_hf(stage, ctx, tmp)
        seconds = time.perf_counter() - t0
        if stage.verify:
            with ctx.task("reload hf export in a fresh process"):
                info["reload"] = reload_images(ctx, tmp, cls)
    data: dict[str, Any] = {"format": "hf", "path": str(out.resolve()), "consumer": f"transformers {cls}",
                            "library": "transformers", "export_seconds": round(seconds, 3),
                            "size_bytes": folder_size(out), **info}
    data["load_code"] = (f"import transformers\nfrom transformers.models.auto.image_processing_auto import "
                         f"AutoImageProcessor\n\nmodel = transformers.{cls}.from_pretrained(\"{out.resolve()}\")\n"
                         f"processor = AutoImageProcessor.from_pretrained(\"{out.resolve()}\")")
    if stage.card:
        data["card"] = CARD
        write_card(out, ctx_report(ctx), data)
    summary = {"format": "hf", "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
    if "reload" in info:
        summary["reload"] = f"max |Δlogit| {info['reload']['max_abs_logit_diff']:.3g}"
    return StageResult(type="export", label=stage.label, data=data, summary=summary, artifacts=[str(out.resolve())])


def export_hf(stage: Any, ctx: "RunContext", out: Path) -> dict:
    from ..export.base import copy_folder, write_meta
    from ..export.hf import _from_pretrained_loads
    from ..models.loading import save_model, storage_dtype_of

    meta = dict(ctx.current.meta)
    if meta.get("format") == "structured":
        raise RecipeError("a `structured` prune stage gave each MLP its own width, which a transformers config "
                          "cannot say. Fix: remove the export stage, or prune with `magnitude`.")
    if stage.dequantize:
        dense, processor = dense_vision_copy(ctx)
        storage = storage_dtype_of(ctx.original.path) or "float32"
        keep = {k: v for k, v in meta.items() if k not in ("format", "versions", "rtn", "hqq", "torchao",
                                                         "dynamic_int8")}
        save_model(dense, processor, out, {**keep, "export": {"format": "hf", "from": str(ctx.current.path),
                                                              "dequantized": True, "storage_dtype": storage}},
                   storage_dtype=storage)
        return {"files": sorted(p.name for p in out.iterdir()), "dequantized": True,
                "caveats": [f"Dequantized: the {meta.get('method') or 'model'}'s weights are stored dense in "
                            f"{storage}; the folder is about as large as the original."]}
    if not _from_pretrained_loads(meta):
        raise RecipeError(f"`{meta.get('method') or meta.get('format')}` saves llmcompress's own layout, which "
                          "plain `from_pretrained` cannot load. Fix: set `dequantize: true` (dense weights).")
    files = copy_folder(ctx.current.path, out)
    write_meta(out, meta, {"format": "hf", "from": str(ctx.current.path)})
    return {"files": files, "dequantized": False, "caveats": []}


def dense_vision_copy(ctx: "RunContext") -> tuple[Any, Any]:
    """A float32 model with the current model's weights, every quantized Linear and rtn Conv2d dequantized."""
    import torch

    from ..export.base import dense_state_dict, fresh_copy, plain_config
    from ..models.loading import torch_dtype
    from ..utils.tensorfile import no_init
    from ..models.family import auto_model_class

    model, processor = fresh_copy(ctx)
    convs = {n: m for n, m in model.named_modules() if type(m).__name__ == "RTNConv2d"}
    state = dense_state_dict(model, torch_dtype(ctx.runtime.dtype))
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{n}." for n in convs))}
    for name, m in convs.items():
        state[f"{name}.weight"] = m.dequantize().float()
        if m.q.bias is not None:
            state[f"{name}.bias"] = m.q.bias.detach().float()
    config = plain_config(model)
    with no_init():
        dense = auto_model_class(config).from_config(config, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, _ = dense.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"dequantized state dict lacks {missing[:5]}")
    return dense.eval(), processor


def reload_images(ctx: "RunContext", folder: Path, cls: str) -> dict:
    """The export reloaded by its consumer in a fresh process; logits compared on 8 digit images."""
    from ..export.base import reload_check
    from .bench import batch_inputs

    model, processor = ctx.current.load()
    x = batch_inputs(model, processor, [8])[8]
    from ..quant.bnb import bnb_cannot_repack

    loader = f"transformers.{cls}.from_pretrained(folder, dtype=dtype)"
    narrow = [n for n, m in model.named_modules() if bnb_cannot_repack(m)]
    if not narrow:
        return reload_check(ctx, loader, folder, inputs={"pixel_values": x}, unit="images")
    # bitsandbytes 0.50.2 cannot repack these layers for its AVX512-BF16 CPU kernel (see quant/bnb.py): consumers on
    # such CPUs need the same one-line workaround the reload uses (it returns the model).
    fix = "llmcompress.quant.bnb.keep_bnb_cpu_packing_to_packable_"
    loader = f"__import__('llmcompress.quant.bnb', fromlist=['_']).keep_bnb_cpu_packing_to_packable_({loader})"
    result = reload_check(ctx, loader, folder, inputs={"pixel_values": x}, unit="images")
    return {**result, "note": f"{len(narrow)} bnb 4-bit layer(s) (e.g. {narrow[0]}) are narrower than bitsandbytes "
                              f"0.50.2's AVX512-BF16 CPU kernel packs: on such CPUs call {fix}(model) after "
                              "from_pretrained (the reload check did)"}
