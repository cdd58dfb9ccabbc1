"""Prune, LoRA, evaluate, benchmark and export on tiny vision models, through the ordinary stage types; the report
of a vision run (headline, markdown, leaderboard row) and detection (mAP) end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmcompress import load_recipe, run_recipe
from llmcompress.models.loading import load_model
from tests.unit.vision_helpers import digits_pixels, vision_ctx


@pytest.fixture(scope="module")
def convnext():
    from llmcompress.vision.tiny import tiny_vision

    return tiny_vision("convnext")


def _run(tmp_path, model, *stages, name="v", dtype="float32"):
    recipe = load_recipe({"name": name, "model": str(model), "threads": 1, "dtype": dtype, "stages": list(stages)})
    return run_recipe(recipe, tmp_path / name, show_progress=False)


# --- metrics ----------------------------------------------------------------------------------------------------------


def test_classification_metrics_count_top1_and_top5():
    from llmcompress.vision.evaluate import classification_metrics

    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 0], [0.0, 9, 1, 2, 3, 4, 5], [9.0, 0, 1, 2, 3, 4, 5]])
    m = classification_metrics(logits, labels=[0, 1, 6], ids=list(range(7)))
    assert m["acc"] == pytest.approx(2 / 3) and m["acc_top5"] == pytest.approx(3 / 3) and m["samples"] == 3
    assert m["acc_stderr"] == pytest.approx(((2 / 3) * (1 / 3) / 3) ** 0.5)
    assert classification_metrics(logits, [0, 1, 6], ids=[1, 0, 2, 3, 4, 5, 6])["acc"] == 0  # mapped to model ids


def test_map_is_one_for_perfect_predictions_and_drops_with_errors():
    from llmcompress.vision.data import ImageDataConfig, load_images
    from llmcompress.vision.evaluate import detection_map

    data = load_images(ImageDataConfig(source="builtin:digits-detect", split="test", samples=40), None,
                       "object-detection")
    perfect = [{"boxes": t["boxes"], "scores": np.ones(len(t["labels"])), "labels": t["labels"]} for t in data.targets]
    assert detection_map(perfect, data.targets)["map"] == pytest.approx(1.0)
    shifted = [{**p, "boxes": p["boxes"] + 2} for p in perfect]  # a 12-20 px box moved 2 px: IoU 0.53 .. 0.68
    m = detection_map(shifted, data.targets)
    assert m["map_50"] == pytest.approx(1.0) and m["map_75"] == 0.0 and 0.1 < m["map"] < 0.5  # COCO: IoU .5:.95
    far = [{**p, "boxes": p["boxes"] + 6} for p in perfect]  # IoU < 0.5 for every box
    assert detection_map(far, data.targets)["map_50"] == 0.0
    wrong = [{**p, "labels": (p["labels"] + 1) % 10} for p in perfect]
    assert detection_map(wrong, data.targets)["map"] == 0.0


def test_divergence_is_zero_against_itself_and_counts_agreement():
    from llmcompress.vision.evaluate import divergence

    a = {"logits": torch.randn(20, 10)}
    same = divergence(a, a, "image-classification")
    assert same["kl_mean"] < 1e-6 and same["top1_agreement"] == 1.0 and same["samples"] == 20
    flipped = {"logits": -a["logits"]}
    other = divergence(a, flipped, "image-classification")
    assert other["kl_mean"] > 0.1 and other["top1_agreement"] == 0.0


# --- stages on the tiny ConvNeXt --------------------------------------------------------------------------------------


def test_quantize_evaluate_benchmark_report(tmp_path, convnext):
    report = _run(tmp_path, convnext, {"type": "quantize", "method": "dynamic-int8"},
                  {"type": "evaluate", "data": {"source": "builtin:digits", "samples": 64}},
                  {"type": "benchmark", "batch_sizes": [1, 4], "repeats": 2, "warmup": 1})
    ev = report["stages"][1]["data"]
    assert ev["settings"]["model_kind"] == "vision" and ev["settings"]["images"] == 64
    assert set(ev["original"]["digits"]) == {"acc", "acc_stderr", "acc_top5", "acc_top5_stderr", "samples"}
    kl = ev["compressed"]["kl"]
    assert 0 <= kl["kl_mean"] < 0.05 and kl["top1_agreement"] > 0.8 and kl["per"] == "image"
    bench = report["stages"][2]["data"]
    for role in ("original", "compressed"):
        figs = bench[role]
        assert figs["images_per_s_bs1"] > 0 and figs["images_per_s_bs4"] > 0 and figs["latency_ms_bs4"] > 0
        assert figs["peak_rss_bytes"] > figs["rss_load_bytes"] / 2 > 0 and figs["load_s"] > 0
    assert bench["compressed"]["param_bytes"] < bench["original"]["param_bytes"]
    assert len([c for c in bench["raw"]["calls"] if c["phase"] == "timed"]) == 2 * 2 * 2  # rounds x batches x models
    head = report["comparison"]["headline"]
    assert head["quality"]["metric"] == "acc" and head["speed"]["figure"] == "images_per_s_bs1"
    assert "images/s" in report["headline"] and "digits acc" in report["headline"]
    md = (tmp_path / "v" / "report.md").read_text()
    assert "images/s (batch 4)" in md and "class distributions over 64 images" in md
    done = md.split("## What was done")[1].split("## Size")[0]
    assert "tasks=" not in done and "prompt_tokens" not in done  # the vision stages' own settings, not LLM defaults
    assert "data={\"source\":\"builtin:digits\"" in done and "batch_sizes=1/4" in done
    assert (tmp_path / "v" / "plots" / "tradeoff.png").stat().st_size > 1000
    from llmcompress.report.leaderboard import run_row

    row = run_row(json.loads((tmp_path / "v" / "report.json").read_text()))
    assert row["quality_metric"] == "digits:acc" and row["speed_figure"] == "images_per_s_bs1"
    assert row["quality_recovery"] is not None and row["size_shrink"] > 1.5


def test_magnitude_prunes_linear_and_conv_weights(tmp_path, convnext):
    ctx = vision_ctx(tmp_path, convnext, [{"type": "prune", "method": "magnitude", "sparsity": 0.5}])
    result = ctx.recipe.stages[0].run(ctx)
    sp = result.data["sparsity"]
    assert sp["pruned_layers"] == pytest.approx(0.5, abs=0.01) and set(sp["by_type"]) == {"Linear", "Conv2d"}
    model = ctx.current.load()[0]
    assert (model.classifier.weight == 0).float().mean() < 0.01  # the head stays dense
    nm = vision_ctx(tmp_path / "nm", convnext, [{"type": "prune", "method": "magnitude", "pattern": "2:4"}])
    result = nm.recipe.stages[0].run(nm)
    assert result.data["pattern_holds"] and result.data["left_dense"] == {} or all(
        "not a multiple of M = 4" in why for why in result.data["left_dense"].values())
    # the 7x7 depthwise filters (49 weights) cannot hold 2:4 groups: listed, left dense
    assert any("dwconv" in n for n in result.data["left_dense"])


def test_structured_pruning_shrinks_the_mlps_and_reloads(tmp_path, convnext):
    ctx = vision_ctx(tmp_path, convnext, [{"type": "prune", "method": "structured", "sparsity": 0.5,
                                           "multiple_of": 16}])
    result = ctx.recipe.stages[0].run(ctx)
    assert result.data["blocks"] == 2 and result.data["removed_share"] == pytest.approx(0.5)
    assert result.data["weights_after"]["parameters"] < result.data["weights_before"]["parameters"]
    assert result.data["size_bytes"] < ctx.original.size_bytes  # really smaller on disk
    model = ctx.current.load()[0]
    layer = model.convnext.encoder.stages[0].layers[0]
    assert (layer.pwconv1.out_features, layer.pwconv2.in_features) == (64, 64)  # 128 hidden channels -> 64
    reloaded = load_model(ctx.stage_dir / "model", "cpu", "float32")[0]
    x = digits_pixels(convnext)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, reloaded(pixel_values=x).logits, atol=1e-6)


def test_structured_then_hqq_then_lora_keep_reload(tmp_path, convnext):
    report = _run(tmp_path, convnext, {"type": "prune", "method": "structured", "sparsity": 0.5, "multiple_of": 16},
                  {"type": "quantize", "method": "hqq", "bits": 8, "group_size": 16},
                  {"type": "lora", "objective": "distill", "steps": 2, "batch_size": 8, "r": 4,
                   "data": {"source": "builtin:digits", "samples": 32}, "merge": ["keep", "dequantized"]},
                  {"type": "evaluate", "data": {"source": "builtin:digits", "samples": 32}})
    lora = report["stages"][2]["data"]
    assert lora["steps"] == 2 and set(lora["merges"]) == {"keep", "dequantized"}
    assert all("acc" in m and "kl_mean" in m for m in lora["merges"].values())
    for mode in ("keep", "dequantized"):
        folder = tmp_path / "v" / "03-lora" / lora["merges"][mode]["path"]
        model = load_model(folder, "cpu", "float32")[0]
        with torch.no_grad():
            assert model(pixel_values=digits_pixels(convnext, 4)).logits.shape == (4, 10)


@pytest.mark.parametrize("method", ["dynamic-int8", "hqq"])
def test_structured_then_a_quantizer_that_follows_the_shapes_reloads(tmp_path, convnext, method):
    # dynamic-int8 quantizes the structured folder; hqq with the pruned MLPs skipped keeps them dense at their new
    # widths, and the folder reloads at those widths.
    extra = {"bits": 8, "group_size": 16, "skip": ["classifier", "pwconv1"]} if method == "hqq" else {}
    _run(tmp_path, convnext, {"type": "prune", "method": "structured", "sparsity": 0.5, "multiple_of": 16},
         {"type": "quantize", "method": method, **extra})
    model = load_model(tmp_path / "v" / "02-quantize" / "model", "cpu", "float32")[0]
    if method == "hqq":  # the dense pwconv1 layers at half their width (hidden 128 and 256 in the tiny ConvNeXt)
        widths = sorted(m.out_features for n, m in model.named_modules() if n.endswith("pwconv1"))
        assert widths == [64, 128]
    with torch.no_grad():
        assert model(pixel_values=digits_pixels(convnext, 4)).logits.shape == (4, 10)


def test_lora_sft_learns_the_digits(tmp_path, convnext):
    report = _run(tmp_path, convnext, {"type": "quantize", "method": "bnb-nf4"},
                  {"type": "evaluate", "data": {"source": "builtin:digits", "samples": 120}},
                  {"type": "lora", "objective": "sft", "epochs": 4, "batch_size": 32, "r": 8, "lr": 0.01,
                   "target_modules": ["pwconv1", "pwconv2", "classifier"],  # a random head must learn too
                   "data": {"source": "builtin:digits", "samples": 640}, "merge": "keep"},
                  {"type": "evaluate", "data": {"source": "builtin:digits", "samples": 120}})
    lora = report["stages"][2]["data"]
    assert lora["loss_last"] < lora["loss_first"] * 0.8 and lora["target_modules"] == 5
    before = report["stages"][1]["data"]["compressed"]["digits"]["acc"]
    after = report["stages"][3]["data"]["compressed"]["digits"]["acc"]
    assert after > before + 0.1  # a random tiny model learns the digits from the adapter alone
    rec = report["comparison"]["recovery"]
    assert rec["vision"] and "acc" in rec["figures"]
    assert "## LoRA recovery" in (tmp_path / "v" / "report.md").read_text()


def test_a_bf16_run_feeds_bf16_pixels_to_every_stage(tmp_path, convnext):
    # `dtype: auto` is bfloat16 on CPUs with native bf16 (AVX512-BF16, AMX): training, evaluation and timing must
    # hand the model pixels in its own dtype (float32 pixels into a bf16 conv raise).
    digits = {"source": "builtin:digits", "samples": 32}
    report = _run(tmp_path, convnext, {"type": "prune", "method": "structured", "sparsity": 0.5, "multiple_of": 16},
                  {"type": "lora", "objective": "sft", "steps": 2, "batch_size": 8, "r": 4, "data": digits},
                  {"type": "evaluate", "data": digits},
                  {"type": "benchmark", "batch_sizes": [2], "repeats": 1, "warmup": 0, "memory": False},
                  dtype="bfloat16")
    assert report["environment"]["dtype"] == "bfloat16"
    assert report["stages"][1]["data"]["steps"] == 2
    assert 0 <= report["stages"][2]["data"]["compressed"]["digits"]["acc"] <= 1
    bench = report["stages"][3]["data"]
    assert bench["backends"]["hf"]["engine"]["dtype"] == "bfloat16" and bench["compressed"]["images_per_s_bs2"] > 0


def test_export_hf_reloads_with_the_task_auto_class(tmp_path, convnext):
    report = _run(tmp_path, convnext, {"type": "quantize", "method": "rtn", "bits": 8, "group_size": 32},
                  {"type": "export", "format": "hf", "dequantize": True})
    data = report["stages"][1]["data"]
    assert data["dequantized"] and data["reload"]["max_abs_logit_diff"] < 1e-4 and data["reload"]["unit"] == "images"
    assert "AutoModelForImageClassification" in data["load_code"]
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(data["path"])
    assert type(model).__name__ == "ConvNextForImageClassification"
    assert "over 8 images" in (tmp_path / "v" / "02-export" / "model" / "README.md").read_text()


def test_bnb_4bit_export_reloads_with_the_narrow_layer_workaround_and_says_so(tmp_path, convnext):
    report = _run(tmp_path, convnext, {"type": "quantize", "method": "bnb-nf4"}, {"type": "export", "format": "hf"})
    reload = report["stages"][1]["data"]["reload"]
    assert reload["max_abs_logit_diff"] < 1e-3 and "keep_bnb_cpu_packing_to_packable_(model)" in reload["note"]


def test_export_refuses_a_layout_from_pretrained_cannot_load(tmp_path, convnext):
    from llmcompress.errors import LLMCompressError

    with pytest.raises(LLMCompressError, match="own layout.*Fix: set `dequantize: true`"):
        _run(tmp_path, convnext, {"type": "quantize", "method": "dynamic-int8"}, {"type": "export", "format": "hf"})


# --- detection --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["yolos", "detr"])
def test_detectors_quantize_evaluate_benchmark(tmp_path, arch):
    from llmcompress.vision.tiny import tiny_vision

    report = _run(tmp_path, tiny_vision(arch), {"type": "quantize", "method": "hqq", "bits": 8, "group_size": 16},
                  {"type": "evaluate", "data": {"source": "builtin:digits-detect", "samples": 20}},
                  {"type": "benchmark", "batch_sizes": [2], "repeats": 1, "warmup": 0, "memory": False})
    q = report["stages"][0]["data"]
    assert q["layers"]["quantized"]["HQQLinear"] > 0
    heads = [n for n in q["skipped_modules"] if "class_labels_classifier" in n or "bbox_predictor" in n]
    assert heads and len(heads) == len(q["skipped_modules"])  # the task heads stay dense, nothing else
    ev = report["stages"][1]["data"]
    assert set(ev["original"]["digits-detect"]) == {"map", "map_50", "map_75", "mar_100", "samples"}
    assert 0 <= ev["compressed"]["digits-detect"]["map"] <= 1 and "box_l1_mean" in ev["compressed"]["kl"]
    assert ev["compressed"]["kl"]["per"] == "detection query"
    assert report["comparison"]["headline"]["quality"]["metric"] == "map"
    assert report["stages"][2]["data"]["compressed"]["images_per_s_bs2"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the set loss runs on float32 outputs
def test_detector_lora_trains_on_boxes(tmp_path, dtype):
    from llmcompress.vision.tiny import tiny_vision

    report = _run(tmp_path, tiny_vision("yolos"),
                  {"type": "lora", "objective": "sft", "steps": 3, "batch_size": 4, "r": 4,
                   "data": {"source": "builtin:digits-detect", "samples": 12}, "merge": "dequantized"}, dtype=dtype)
    lora = report["stages"][0]["data"]
    assert lora["steps"] == 3 and all(np.isfinite(lora["loss_curve"]))


def test_detection_smoke_recipe_runs(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    report = run_recipe(load_recipe(root / "recipes" / "vision-detect-smoke.yaml", ["stages.1.data.samples=40"]),
                        tmp_path / "d", show_progress=False)
    assert report["comparison"]["headline"]["quality"]["metric"] == "map"
    assert report["models"]["compressed"]["eval"]["digits-detect"]["samples"] == 40
    assert report["models"]["compressed"]["bench"]["images_per_s_bs8"] > 0


def test_benchmark_refuses_a_compare_model_of_another_kind(tmp_path, convnext):
    from llmcompress.errors import LLMCompressError
    from llmcompress.models.tiny import tiny_random_llama

    with pytest.raises(LLMCompressError, match=r"`compare` entry .* is a llm model.*Fix: compare runs of the same"):
        _run(tmp_path, convnext, {"type": "benchmark", "batch_sizes": [1], "repeats": 1, "warmup": 0,
                                  "memory": False, "compare": [str(tiny_random_llama())]})
