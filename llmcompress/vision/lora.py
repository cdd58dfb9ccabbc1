"""The lora stage on a vision model: peft LoRA on the Linear layers (the task head stays out), trained on images.

    - type: lora
      objective: sft              # sft: cross-entropy on the labels (detection: the model's own set loss)
                                  # distill: KL(original || student) of the class distributions, no labels
      data: {source: builtin:digits, split: train}   # default: the builtin data of the task, train split
      r: 8
      lr: 0.001
      epochs: 1
      batch_size: 32
      merge: [dequantized, keep]  # keep | requantize | dequantized (as for LLMs)

The LLM stage's pieces are reused: the adapter inits (default, loftq, pissa), the train loop (AdamW, schedule,
gradient accumulation, clipping), saving the adapter, and the merge modes; ``dequantized`` here also expands rtn's
quantized Conv2d layers (they carry no adapter but must be dense in a dense model). With several merge modes each
is measured on the held-out images (accuracy, KL vs the original).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageResult


@dataclass
class ImageTrainData:
    """``pixel_values`` (N, C, H, W) and labels: model class ids (N,), or per-image detection targets."""

    pixel_values: Any
    labels: Any

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def batches(self, batch_size: int, seed: int) -> Iterator[dict]:
        """Endless micro-batches, a fresh seeded shuffle every epoch (as the text data's)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=gen)
            for i in range(0, len(self), batch_size):
                idx = order[i: i + batch_size]
                labels = self.labels[idx] if isinstance(self.labels, torch.Tensor) else [
                    self.labels[j] for j in idx.tolist()]
                yield {"pixel_values": self.pixel_values[idx], "labels": labels}


def sft_loss(model: Any, batch: dict, teacher: Any = None, temperature: float = 1.0):
    """The model's own supervised loss: cross-entropy (classifiers) or the Hungarian set loss (DETR/YOLOS).

    A detector in bf16/fp16 gets its set loss on float32 logits and boxes (the matcher's ``torch.cdist`` has no bf16
    CPU kernel); that path leaves out the auxiliary decoder losses (``config.auxiliary_loss``, off by default)."""
    import torch

    x, labels = _on_model(model, batch)
    detection = not isinstance(labels, torch.Tensor)
    if not detection or x.dtype == torch.float32:
        return model(pixel_values=x, labels=labels).loss
    out = model(pixel_values=x)
    return model.loss_function(out.logits.float(), labels, x.device, out.pred_boxes.float(), model.config)[0]


def _on_model(model: Any, batch: dict) -> tuple[Any, Any]:
    """The batch's pixels and labels on the model's device (the training data stay on the CPU)."""
    import torch

    device = next(model.parameters()).device
    labels = batch["labels"]
    if isinstance(labels, torch.Tensor):
        labels = labels.to(device)
    else:
        labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
    return batch["pixel_values"].to(device), labels


def distill_loss(model: Any, batch: dict, teacher: Any = None, temperature: float = 1.0):
    """KL(teacher || student) of the class distributions (per image, or per detection query) at T, times T²."""
    import torch
    import torch.nn.functional as F

    x, _ = _on_model(model, batch)
    with torch.no_grad():
        log_p = F.log_softmax(teacher(pixel_values=x).logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(model(pixel_values=x).logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


LOSSES = {"sft": sft_loss, "distill": distill_loss}


def run_lora(stage: Any, ctx: "RunContext") -> "StageResult":
    from ..errors import require
    import torch

    from ..models.loading import storage_dtype_of
    from ..lora import INITS
    from ..lora.init import save_adapter
    from ..lora.train import fresh_student, train_loop_
    from ..stage import StageResult
    from .data import check_data

    require("peft", "lora", "The lora stage")
    t0 = time.perf_counter()
    task = ctx.model_task
    task = task or "image-classification"
    cfg_data = train_data_config(stage, task)
    check_data(cfg_data, ctx.recipe.base_dir, task, "lora: data")  # before any weights load
    model, processor, teacher, seed = fresh_student(stage, ctx)
    t = time.perf_counter()
    data, n_images = image_train_data(cfg_data, ctx, task, model, processor)
    data_seconds = time.perf_counter() - t
    names = adapter_targets(model, stage, task)
    stage = stage.model_copy(update={"target_modules": names})  # the head left out; what peft wraps, by name
    torch.manual_seed(seed)
    model, init_info = INITS.get(stage.init)(model, stage, ctx)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    losses, _, _ = train_loop_(model, data, LOSSES[stage.objective], stage, ctx, teacher, seed)  # one process
    train_seconds = time.perf_counter() - t
    adapter_dir = ctx.stage_dir / "adapter"
    save_adapter(model, adapter_dir, init_info, dtype=storage_dtype_of(ctx.original.path))
    del model
    k = max(1, min(5, len(losses) // 4))
    trained = {
        "objective": stage.objective, "init": stage.init, "base": ctx.current.describe(),
        "base_size_bytes": ctx.current.size_bytes, "images": n_images, "data": cfg_data.model_dump(exclude_none=True),
        "steps": len(losses), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
        "loss_curve": [round(x, 5) for x in losses], "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / max(len(losses), 1), 3), "data_seconds": round(data_seconds, 3),
        "trainable_params": trainable, "total_params": total, "target_modules": len(names),
        "adapter_bytes": sum(p.stat().st_size for p in adapter_dir.glob("*.safetensors")),
        **{k2: v for k2, v in init_info.items() if not k2.startswith("_")},
    }
    meta = {"kind": "vision", "lora": {"objective": stage.objective, "init": stage.init, "r": stage.r,
                                       "alpha": stage.lora_alpha, "target_modules": names, "steps": len(losses),
                                       "data": cfg_data.model_dump(), "base": ctx.current.describe()}}
    merges, measured = merge_all(stage, ctx, adapter_dir, meta, task)
    out = {**trained, "merge": stage.merges[0], "merges": merges, "seconds_total": round(time.perf_counter() - t0, 3),
           "applied_config": {**stage.model_dump(mode="json", exclude_none=True, exclude={"target_modules"}),
                              "data": cfg_data.model_dump(mode="json", exclude_none=True),
                              "target_modules": f"{len(names)} Linear layers (task head left out)"}}
    if measured:
        out["merges_measured_with"] = measured
    primary = merges[stage.merges[0]]
    summary = {"objective": stage.objective, "loss": f"{trained['loss_first']:.4g} -> {trained['loss_last']:.4g}",
               "steps": len(losses), "train": f"{train_seconds:.0f}s",
               "adapter": f"{trained['adapter_bytes'] / 2**20:.2f} MiB", "merge": stage.merges[0],
               "size": f"{primary['size_bytes'] / 2**20:.1f} MiB"}
    return StageResult(type="lora", label=stage.label, model_dir="model", data=out, summary=summary)


def train_data_config(stage: Any, task: str):
    from .data import DIGITS, DIGITS_DETECT, ImageDataConfig

    given = stage.data if "data" in stage.model_fields_set else None
    if given is not None and not isinstance(given, ImageDataConfig):
        raise RecipeError("a vision model fine-tunes on images, and `data` names text. Fix: set "
                          "`data: {source: builtin:digits, split: train}`.")
    cfg = given or ImageDataConfig(source=DIGITS_DETECT if task == "object-detection" else DIGITS)
    return cfg.with_split("train")


def image_train_data(cfg: Any, ctx: "RunContext", task: str, model: Any, processor: Any) -> tuple[ImageTrainData, int]:
    """Pixel values and labels of the training images (detection: DETR-style targets, boxes cxcywh in [0, 1])."""
    import torch

    from .data import input_dtype, label_ids, load_images, to_model_input

    data = load_images(cfg, ctx.recipe.base_dir, task)
    ids = label_ids(data, model.config)
    x = to_model_input(data.images, processor, model.config).to(input_dtype(model))  # on the CPU; batches move
    if task == "object-detection":
        labels = []
        for im, t in zip(data.images, data.targets):
            b = torch.as_tensor(t["boxes"], dtype=torch.float32)
            w, h = im.width, im.height
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                  (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], -1)
            labels.append({"class_labels": torch.as_tensor([ids[c] for c in t["labels"]], dtype=torch.long),
                           "boxes": cxcywh})
    else:
        labels = torch.as_tensor([ids[y] for y in data.labels], dtype=torch.long)
    return ImageTrainData(pixel_values=x, labels=labels), len(data)


def adapter_targets(model: Any, stage: Any, task: str) -> list[str]:
    """Linear(-like) layers the adapter goes on: ``all-linear`` = every one but the task head."""
    from ..lora.layers import _is_linear_like
    from ..utils.patterns import matches_any
    from .quant import default_skip

    head = default_skip(task)
    linear = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
    if stage.target_modules == "all-linear":
        picked = [n for n in linear if not matches_any(n, head)]
    else:
        picked = [n for n in linear if matches_any(n, stage.target_modules)]
    if not picked:
        short = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
        names = short or "(none: the layers are quantized in a form peft cannot wrap; use bnb, hqq or torchao-int8wo)"
        raise RecipeError(f"target_modules {stage.target_modules} match no Linear layer of this model. Fix: use "
                          f"names from {names}, or `all-linear`")
    return picked


# ---------------------------------------------------------------------------------------------------------------------
# Merges


def merge_all(stage: Any, ctx: "RunContext", adapter_dir: Path, meta: dict, task: str) -> tuple[dict, dict | None]:
    """Every merge mode (the first into <stage>/model); with several, each measured on the held-out images."""
    from ..lora import MERGES
    from ..lora.merge import MergeInputs
    from ..lora.stage import MERGES_DIR

    inputs = MergeInputs.from_context(ctx, stage, adapter_dir, meta)
    out: dict[str, dict] = {}
    for i, mode in enumerate(stage.merges):
        target = ctx.stage_dir if i == 0 else ctx.stage_dir / MERGES_DIR / mode
        t = time.perf_counter()
        merge = merge_dequantized if mode == "dequantized" else MERGES.get(mode)
        with ctx.task(f"lora: merge {mode}"):
            info = merge(inputs, target, ctx)
        out[mode] = {**info, "seconds": round(time.perf_counter() - t, 3),
                     "path": str((target / "model").relative_to(ctx.stage_dir))}
    measured = measure_merges(ctx, out, task) if len(stage.merges) > 1 else None
    return out, measured


def merge_dequantized(inputs: Any, target: Path, ctx: "RunContext") -> dict:
    """The LLM ``dequantized`` merge, plus rtn's Conv2d layers of the base dequantized into the dense copy."""
    import torch

    from ..context import weight_bytes
    from ..lora.merge import _method, merged_dense
    from ..models.loading import load_model, read_meta, save_model
    from ..utils.io import atomic_dir

    dense, processor, replaced = merged_dense(inputs, dequantized=True)
    if (read_meta(inputs.base).get("rtn") or {}).get("conv_modules"):  # only rtn quantizes Conv2d layers
        base = load_model(inputs.base, "cpu", "float32")[0]
        for name, m in base.named_modules():
            if type(m).__name__ == "RTNConv2d":
                conv = dense.get_submodule(name)
                conv.weight = torch.nn.Parameter(m.dequantize().to(conv.weight.dtype), requires_grad=False)
                replaced += 1
    meta = {**inputs.meta, "merge": "dequantized", "method": _method(read_meta(inputs.base), "dequantized"),
            "dequantized_modules": replaced}
    structure = read_meta(inputs.source).get("structured")
    if structure:
        meta.update(format="structured", structured=structure)
    with atomic_dir(target / "model") as tmp:
        save_model(dense, processor, tmp, meta, storage_dtype=inputs.storage_dtype)
    return {"size_bytes": weight_bytes(target / "model")}


def measure_merges(ctx: "RunContext", merges: dict[str, dict], task: str) -> dict:
    """Accuracy (or mAP) and KL vs the original of each merged folder, on the held-out images."""
    from ..context import ModelHandle
    from .data import load_images
    from .evaluate import DEFAULT_BATCH, data_config, divergence, evaluate_model

    cfg = data_config(None, task, "test")
    data = load_images(cfg, ctx.recipe.base_dir, task)
    reference = evaluate_model(ctx.original, data, task, DEFAULT_BATCH)[1]
    with ctx.task("lora: measure merge modes", total=len(merges)) as advance:
        for info in merges.values():
            handle = ModelHandle("merge", ctx.stage_dir / info["path"], ctx.runtime)
            metrics, outputs = evaluate_model(handle, data, task, DEFAULT_BATCH)
            kl = divergence(reference, outputs, task)
            score = "map" if task == "object-detection" else "acc"
            info.update({score: metrics[data.name][score], "kl_mean": kl["kl_mean"],
                         "top1_agreement": kl["top1_agreement"]})
            handle.release()
            advance(1)
    return {"data": f"{cfg.source} ({cfg.split} split)", "images": len(data), **ctx.runtime.describe()}
