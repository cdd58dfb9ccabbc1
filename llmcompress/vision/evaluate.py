"""The evaluate stage on a vision model: accuracy (classification) or mAP (detection) on held-out images, for the
original and the compressed model, plus how far the compressed model's outputs moved from the original's.

    - type: evaluate
      data: {source: builtin:digits, split: test, samples: null}   # default: the builtin data of the model's task
      kl: true                                                   # KL(original || compressed) + agreement
      batch_size: 64

Classification: top-1 (``acc``) and top-5 (``acc_top5``) accuracy with binomial standard errors, so the report
marks changes within noise. Detection: COCO mAP (``map``, ``map_50``, ``map_75``, ``mar_100``) by pycocotools'
``COCOeval`` on the processor's post-processed boxes (no score threshold, every query kept). (torchmetrics'
``MeanAveragePrecision`` wraps the same code but refuses to run without torchvision, which does not import here.)
KL: per image (detection: per query) KL of the class distributions, top-1 agreement of the predicted classes, and
for detectors the mean L1 shift of the predicted boxes. The original's figures are cached across runs.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError, require

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext
    from ..stage import StageResult
    from .data import ImageDataConfig, ImageSet

#: Bump when a change here changes the figures, so cached original results are recomputed.
EVAL_VERSION = 1
DEFAULT_BATCH = 64


def data_config(cfg: "ImageDataConfig | None", task: str | None, split: str) -> "ImageDataConfig":
    """``cfg`` (its split filled in), or the builtin data of the task."""
    from .data import DIGITS, DIGITS_DETECT, ImageDataConfig

    if cfg is None:
        cfg = ImageDataConfig(source=DIGITS_DETECT if task == "object-detection" else DIGITS)
    return cfg.with_split(split)


def run_evaluate(stage: Any, ctx: "RunContext") -> "StageResult":
    from ..eval.stage import measure_both, summarize
    from ..stage import StageResult
    from .data import check_data, load_images

    t0 = time.perf_counter()
    task = ctx.model_task
    task = task or "image-classification"
    cfg = data_config(stage.data, task, "test")
    where = f"evaluate: data `{cfg.source}`"
    check_data(cfg, ctx.recipe.base_dir, task, where)
    if task == "object-detection":
        require("pycocotools", "vision", "mAP (the evaluate stage on a detector)")
    data = load_images(cfg, ctx.recipe.base_dir, task)
    batch = stage.batch_size if "batch_size" in stage.model_fields_set else DEFAULT_BATCH
    subset = f", {cfg.samples} sampled (seed {cfg.seed})" if cfg.samples else ""
    settings = {"model_kind": "vision", "task": task, "data": f"{cfg.source} ({cfg.split} split{subset})",
                "data_fingerprint": data.fingerprint, "images": len(data), "batch_size": batch, "kl": stage.kl,
                **ctx.runtime.describe(), "notes": list(data.notes)}

    def evaluate(handle: "ModelHandle", timing: dict, reference: "ModelHandle | None") -> dict:
        results, outputs = evaluate_model(handle, data, task, batch)
        if reference is not None and stage.kl:
            results["kl"] = divergence(evaluate_model(reference, data, task, batch)[1], outputs, task)
        return results

    original, compressed, timing, same = measure_both(ctx, "vision-evaluate", settings, EVAL_VERSION, evaluate)
    if not settings["notes"]:
        del settings["notes"]
    applied = {"type": "evaluate", "data": cfg.model_dump(mode="json", exclude_none=True), "kl": stage.kl,
               "batch_size": batch}
    result = {"settings": settings, "original": original, "compressed": compressed, "timing": timing,
              "applied_config": applied}
    return StageResult(type="evaluate", label=stage.label, seconds=time.perf_counter() - t0, data=result,
                       summary=summarize(original, compressed, same=same))


def evaluate_model(handle: "ModelHandle", data: "ImageSet", task: str, batch: int) -> tuple[dict, dict]:
    """``({data name: metrics}, raw outputs)`` of one model on ``data``."""
    from .data import label_ids

    model, processor = handle.load()
    ids = label_ids(data, model.config)
    outputs = forward_all(model, processor, data.images, batch, task)
    if task == "object-detection":
        metrics = detection_map(predictions(outputs, processor, data, ids), data.targets)
    else:
        metrics = classification_metrics(outputs["logits"], data.labels, ids)
    return {data.name: metrics}, outputs


def forward_all(model: Any, processor: Any, images: list, batch: int, task: str) -> dict:
    """Logits (and detection boxes) of every image, batch by batch, on CPU in float32."""
    import torch

    from .data import model_input

    logits, boxes = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            out = model(pixel_values=model_input(images[i: i + batch], processor, model))
            logits.append(out.logits.float().cpu())
            if task == "object-detection":
                boxes.append(out.pred_boxes.float().cpu())
    return {"logits": torch.cat(logits), **({"pred_boxes": torch.cat(boxes)} if boxes else {})}


def classification_metrics(logits: Any, labels: list[int], ids: list[int]) -> dict:
    """Top-1 / top-5 accuracy (with binomial standard errors) of ``logits`` (N, num_labels) against dataset labels
    mapped to model ids."""
    import torch

    target = torch.as_tensor([ids[y] for y in labels])
    n = len(target)
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    acc1 = (top[:, 0] == target).float().mean().item()
    acc5 = (top == target[:, None]).any(-1).float().mean().item()
    se = lambda p: (p * (1 - p) / n) ** 0.5  # noqa: E731
    return {"acc": acc1, "acc_stderr": se(acc1), "acc_top5": acc5, "acc_top5_stderr": se(acc5), "samples": n}


def predictions(outputs: dict, processor: Any, data: "ImageSet", ids: list[int]) -> list[dict]:
    """Post-processed boxes per image (xyxy pixels, every query, no threshold), labels as dataset class indices."""
    import torch
    from transformers.utils import ModelOutput

    to_class = {m: c for c, m in enumerate(ids)}
    sizes = [(im.height, im.width) for im in data.images]
    out = ModelOutput(logits=outputs["logits"], pred_boxes=outputs["pred_boxes"])
    preds = processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
    result = []
    for p in preds:
        keep = torch.tensor([int(lab) in to_class for lab in p["labels"]], dtype=torch.bool)
        labels = torch.tensor([to_class[int(lab)] for lab in p["labels"][keep]], dtype=torch.long)
        result.append({"boxes": p["boxes"][keep].float(), "scores": p["scores"][keep].float(), "labels": labels})
    return result


def detection_map(preds: list[dict], targets: list[dict]) -> dict:
    """COCO mAP (pycocotools' ``COCOeval``, bbox) of ``preds`` (``boxes`` xyxy, ``scores``, ``labels``) against
    ``targets`` (``boxes`` xyxy, ``labels``): ``map`` (IoU .50:.95), ``map_50``, ``map_75``, ``mar_100``."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b) -> list[float]:
        x0, y0, x1, y1 = (float(v) for v in b)
        return [x0, y0, x1 - x0, y1 - y0]

    images, anns, dets = [], [], []
    classes = sorted({int(c) for t in targets for c in np.asarray(t["labels"]).tolist()}
                     | {int(c) for p in preds for c in np.asarray(p["labels"]).tolist()})
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i})
        for b, c in zip(np.asarray(t["boxes"]).tolist(), np.asarray(t["labels"]).tolist()):
            w, h = xywh(b)[2:]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": xywh(b),
                         "area": w * h, "iscrowd": 0})
        for b, s, c in zip(np.asarray(p["boxes"]).tolist(), np.asarray(p["scores"]).tolist(),
                           np.asarray(p["labels"]).tolist()):
            dets.append({"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)})
    out = {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "mar_100": 0.0, "samples": len(targets)}
    if not anns or not dets:
        return out
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in classes]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(x)) for x in ev.stats]  # -1 = no such objects (e.g. no large boxes): reported as 0
    out.update(map=stats[0], map_50=stats[1], map_75=stats[2], mar_100=stats[8])
    return out


def divergence(reference: dict, outputs: dict, task: str) -> dict:
    """KL(P_original || P_compressed) of the class distributions (per image, or per detection query), the share of
    identical top-1 classes, and for detectors the mean L1 shift of the predicted (normalized) boxes."""
    import torch

    lp = reference["logits"].float().log_softmax(-1).reshape(-1, reference["logits"].shape[-1])
    lq = outputs["logits"].float().log_softmax(-1).reshape(-1, outputs["logits"].shape[-1])
    if lp.shape != lq.shape:
        raise RecipeError(f"KL: the models' outputs differ in shape ({tuple(lp.shape)} vs {tuple(lq.shape)}). "
                          "Fix: set `kl: false`.")
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).double()
    out = {"kl_mean": kl.mean().item(), "kl_p95": torch.quantile(kl, 0.95).item(), "kl_max": kl.max().item(),
           "top1_agreement": (lp.argmax(-1) == lq.argmax(-1)).float().mean().item(), "samples": len(kl),
           "per": "detection query" if task == "object-detection" else "image"}
    if task == "object-detection":
        out["box_l1_mean"] = (reference["pred_boxes"] - outputs["pred_boxes"]).abs().mean().item()
    return out
