"""Structured (conv channel) pruning of the builtin digits ResNet and MobileNetV2: size, accuracy and latency.

    python benchmarks/vision_prune.py                 # -> benchmarks/results/vision_prune.json
    python benchmarks/vision_prune.py --sparsities 0.3 0.5 --finetune-epochs 3

For each model and sparsity: ``method: structured`` (torch-pruning's dependency graph, L2 group importance) on the
trained builtin, top-1 with the stale BatchNorm statistics, then re-estimated on 256 training digits as the stage
does (``top1_pruned``), saved as the prune stage saves it (``format: structured``) and reloaded with llmcompress's
loader (max |logit difference| recorded), then a short plain full fine-tune (AdamW, one-cycle, cross-entropy on the
1,437 training digits: the conv layers are trained directly, no adapter). Measured on one CPU thread: parameters, size
of the saved folder's weights, top-1 on the 360 held-out digits, latency at batch 1 and 32 (the median pass of each
call, the median over interleaved rounds: original, pruned, original, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("digits-resnet", "digits-mobilenet")
BATCHES = (1, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/vision_prune.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    results = {"settings": {"threads": 1, "device": "cpu", "dtype": "float32", "batch_sizes": list(BATCHES),
                            "rounds": args.rounds, "finetune": f"plain full fine-tune, {args.finetune_epochs} "
                            "epochs, AdamW lr 1e-3 one-cycle, batch 64, seed 0 (all weights; no LoRA)",
                            "torch": torch.__version__}, "models": {}}
    for name in args.models:
        results["models"][name] = measure_model(name, args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}", flush=True)


def measure_model(name: str, args) -> dict:
    from llmcompress.models import MODELS as BUILTINS
    from llmcompress.models.loading import load_model
    from llmcompress.vision.bench import batch_inputs
    from llmcompress.vision.builtin import digits_processor
    from llmcompress.vision.data import digits_arrays
    from llmcompress.vision.train import accuracy, pixel_tensor

    folder = Path(BUILTINS.get(name)())
    original, _ = load_model(folder, "cpu", "float32")
    processor = digits_processor()
    data = {split: pixel_tensor(*digits_arrays(split), processor, original.config) for split in ("train", "test")}
    inputs = batch_inputs(original, processor, list(BATCHES))
    out = {"folder": str(folder), "original": {**_static(original, folder), "top1": accuracy(original, *data["test"])}}
    print(name, out["original"], flush=True)
    for sparsity in args.sparsities:
        out[f"sparsity_{sparsity}"] = measure_pruned(original, processor, sparsity, data, inputs, args)
        print(name, sparsity, json.dumps(out[f"sparsity_{sparsity}"]), flush=True)
    return out


def measure_pruned(original, processor, sparsity: float, data: dict, inputs: dict, args) -> dict:
    import torch

    from llmcompress.models.loading import load_model, save_model
    from llmcompress.prune import PRUNERS  # first: importing vision.prune alone meets a circular import
    from llmcompress.vision.data import load_images, model_input
    from llmcompress.vision.prune_conv import prune_conv_, recalibrate_batchnorm_
    from llmcompress.vision.train import accuracy, train_classifier_

    model = copy.deepcopy(original)
    cfg = PRUNERS.get("structured")(sparsity=sparsity)
    t0 = time.perf_counter()
    info = prune_conv_(model, cfg)
    prune_s = time.perf_counter() - t0
    row = {"prune_seconds": round(prune_s, 2), "removed_conv_channels": round(info["removed_share"], 4),
           "left_whole": info["left_whole"], "top1_pruned_stale_bn": accuracy(model, *data["test"])}
    calib = cfg.bn_calibration.with_split("train")  # as the prune stage does: 256 training digits
    images = load_images(calib, None, "image-classification").images
    row["bn_calibration_images"] = len(images)
    recalibrate_batchnorm_(model, model_input(list(images), processor, model))
    row["top1_pruned"] = accuracy(model, *data["test"])
    with tempfile.TemporaryDirectory() as tmp:
        meta = {"format": "structured", "kind": "vision", "task": "image-classification", "method": "structured",
                "structured": {"modules": info["shapes"]}}
        save_model(model, processor, Path(tmp), meta)
        reloaded, _ = load_model(tmp, "cpu", "float32")
        with torch.no_grad():
            x = inputs[32]
            row["reload_max_abs_logit_diff"] = (model(pixel_values=x).logits
                                                - reloaded(pixel_values=x).logits).abs().max().item()
        row.update(_static(model, Path(tmp)))
    t0 = time.perf_counter()
    losses = train_classifier_(model, *data["train"], epochs=args.finetune_epochs, batch_size=64, lr=1e-3,
                               weight_decay=0.05, seed=0)
    row.update(finetune_seconds=round(time.perf_counter() - t0, 1), finetune_loss_last=round(losses[-1], 4),
               top1_finetuned=accuracy(model, *data["test"]))
    row["latency"] = _latency({"original": original, "pruned": model}, inputs, args.rounds)
    return row


def _static(model, folder: Path) -> dict:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "weights_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def _latency(models: dict, inputs: dict, rounds: int) -> dict:
    """Median forward latency (ms) per model and batch size over interleaved rounds, and pruned/original ratios."""
    from llmcompress.vision.bench import forward, time_call

    per: dict = {(role, b): [] for role in models for b in inputs}
    for x in inputs.values():
        for m in models.values():
            for _ in range(3):
                forward(m, x)  # warm-up
    for _ in range(rounds):
        for b, x in inputs.items():
            for role, m in models.items():
                per[role, b].append(time_call(m, x)[f"latency_ms_bs{b}"])
    out = {f"{role}_ms_bs{b}": round(statistics.median(v), 3) for (role, b), v in per.items()}
    for b in inputs:
        out[f"speedup_bs{b}"] = round(statistics.median(
            o / p for o, p in zip(per["original", b], per["pruned", b])), 3)
    return out


if __name__ == "__main__":
    main()
