"""``method: structured`` on convolutional classifiers (ResNet, MobileNetV2): whole conv channels removed through
torch-pruning's dependency graph, the folder reloaded by llmcompress (also in a fresh process) and refused by plain
transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmcompress import load_recipe, run_recipe
from llmcompress.errors import RecipeError
from llmcompress.models.loading import OWN_LAYOUT_KEY, load_model, read_meta
from tests.unit.vision_helpers import digits_pixels, vision_ctx

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def resnet():
    from llmcompress.vision.tiny import tiny_vision

    return tiny_vision("resnet")


@pytest.fixture(scope="module")
def mobilenet():
    from llmcompress.vision.tiny import tiny_vision

    return tiny_vision("mobilenet")


def _prune(tmp_path, folder, **cfg):
    ctx = vision_ctx(tmp_path, folder, [{"type": "prune", "method": "structured", **cfg}])
    return ctx, ctx.recipe.stages[0].run(ctx)


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_resnet_loses_half_its_conv_channels_and_stays_consistent(tmp_path, resnet):
    ctx, result = _prune(tmp_path, resnet, sparsity=0.5)
    original = load_model(resnet, "cpu", "float32")[0]
    model = ctx.current.load()[0]
    before, after = _convs(original), _convs(model)
    # tiny ResNet: embedder 16, stage 1 (16), stage 2 (32) -> every conv keeps half its outputs, inputs follow
    for name, conv in after.items():
        assert conv.out_channels == before[name].out_channels // 2, name
    assert after["resnet.embedder.embedder.convolution"].in_channels == 3  # the image's channels stay
    assert model.classifier[-1].out_features == 10 and model.classifier[-1].in_features == 16
    for name, m in model.named_modules():  # every BatchNorm follows its conv
        if isinstance(m, torch.nn.BatchNorm2d):
            conv = model.get_submodule(name.rsplit(".", 1)[0] + ".convolution")
            assert m.num_features == conv.out_channels == m.running_mean.numel()
    params = sum(p.numel() for p in model.parameters())
    assert params == result.data["weights_after"]["parameters"] < 0.35 * result.data["weights_before"]["parameters"]
    assert result.data["removed_share"] == pytest.approx(0.5) and result.data["left_whole"] == []
    assert result.data["size_bytes"] < 0.4 * ctx.original.size_bytes  # smaller on disk
    with torch.no_grad():
        assert model(pixel_values=digits_pixels(resnet, 4)).logits.shape == (4, 10)


def test_mobilenet_depthwise_convs_keep_one_group_per_channel(tmp_path, mobilenet):
    ctx, result = _prune(tmp_path, mobilenet, sparsity=0.5)
    model = ctx.current.load()[0]
    depthwise = [m for m in _convs(model).values() if m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    original = _convs(load_model(mobilenet, "cpu", "float32")[0])
    narrow = set(result.data["left_whole"])  # 8-channel layers: half of 8 is below multiple_of 8, so they stay
    assert narrow and all(original[n].out_channels * 0.5 < 8 for n in narrow)
    for name, conv in _convs(model).items():
        if name not in narrow and original[name].out_channels >= 16 and original[name].groups == 1:
            assert conv.out_channels < original[name].out_channels, name
    with torch.no_grad():
        assert model(pixel_values=digits_pixels(mobilenet, 4)).logits.shape == (4, 10)


_FRESH = """
import json, sys, torch
import transformers
folder, x_file, auto = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    getattr(transformers, auto).from_pretrained(folder)
    refused = None
except Exception as e:
    refused = f"{type(e).__name__}: {e}"
from llmcompress.models.loading import load_model
model = load_model(folder, "cpu", "float32")[0]
with torch.no_grad():
    logits = model(pixel_values=torch.load(x_file)).logits
print(json.dumps({"refused": refused, "logits": logits.tolist()}))
"""


@pytest.mark.parametrize("arch", ["resnet", "mobilenet", "rtdetr"])
def test_a_fresh_process_reloads_the_same_logits_and_plain_transformers_refuses(tmp_path, arch, request):
    from llmcompress.vision.tiny import tiny_vision

    folder = tiny_vision(arch)
    ctx, _ = _prune(tmp_path, folder, sparsity=0.5)
    saved = ctx.stage_dir / "model"
    assert read_meta(saved)["format"] == "structured"
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"][OWN_LAYOUT_KEY] == "structured"
    assert "load_model" in config["quantization_config"]["load_with"]
    x = digits_pixels(folder, 8)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = ctx.current.load()[0](pixel_values=x).logits
    auto = "AutoModelForObjectDetection" if arch == "rtdetr" else "AutoModelForImageClassification"
    out = subprocess.run([sys.executable, "-c", _FRESH, str(saved), str(tmp_path / "x.pt"), auto], capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # transformers refuses the marked config outright, not with a wall of size mismatches
    assert got["refused"] and "quant_method" in got["refused"] and "size mismatch" not in got["refused"]
    # the same weights and shapes; a fresh process may pick another conv kernel (MobileNet: |diff| ~1e-5 at |logit| ~5)
    assert torch.allclose(torch.tensor(got["logits"], dtype=expected.dtype), expected, rtol=1e-5, atol=1e-5)


def test_rtdetr_prunes_its_backbone_and_conv_neck_and_keeps_the_transformer_widths(tmp_path):
    from llmcompress.vision.tiny import tiny_vision

    folder = tiny_vision("rtdetr")
    ctx, result = _prune(tmp_path, folder, sparsity=0.5)
    original = load_model(folder, "cpu", "float32")[0]
    model = ctx.current.load()[0]
    before, after = _convs(original), _convs(model)
    changed = {n for n in after if after[n].weight.shape != before[n].weight.shape}
    assert any(n.startswith("model.backbone.") for n in changed)
    assert any(n.startswith("model.encoder.") for n in changed)
    # the input projections keep their outputs (the decoder's projections read the narrower neck), the decoder and
    # every Linear / LayerNorm keep their widths
    assert all(after[n].out_channels == before[n].out_channels for n in after if "input_proj" in n)
    assert any(n.startswith("model.decoder_input_proj") for n in changed)
    assert not any(n.startswith("model.decoder.") for n in changed)
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            assert m.weight.shape == original.get_submodule(n).weight.shape, n
    frozen = [m for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d")]
    assert any(m.weight.numel() < 16 for m in frozen)  # frozen norms pruned with their convs (custom pruner)
    assert result.data["weights_after"]["parameters"] < 0.5 * result.data["weights_before"]["parameters"]
    assert result.data["bn_calibration"]["data"].startswith("builtin:digits-detect")
    with torch.no_grad():
        out = model(pixel_values=digits_pixels(folder, 2))
    assert out.logits.shape == (2, 10, 10) and out.pred_boxes.shape == (2, 10, 4)


def test_multiple_of_wider_than_what_a_layer_keeps_is_refused(tmp_path, resnet):
    with pytest.raises(RecipeError, match=r"`multiple_of: 16` with `sparsity: 0.5` keeps none of layer "
                                          r"`resnet\.embedder.*16 output channels.*Fix: set `multiple_of` to at "
                                          r"most 8"):
        _prune(tmp_path, resnet, sparsity=0.5, multiple_of=16)


def test_structured_on_an_architecture_it_does_not_know_says_so(tmp_path):
    from llmcompress.vision.tiny import tiny_vision

    with pytest.raises(RecipeError, match=r"knows the MLP blocks of .* and the conv channels of mobilenet_v2, "
                                          r"resnet, rt_detr, not `detr`.*Fix: use `method: magnitude`"):
        _prune(tmp_path, tiny_vision("detr"), sparsity=0.5)


def test_prune_evaluate_benchmark_recipe_on_a_conv_model(tmp_path, resnet):
    digits = {"source": "builtin:digits", "samples": 32}
    recipe = load_recipe({"name": "c", "model": str(resnet), "threads": 1, "dtype": "float32", "stages": [
        {"type": "prune", "method": "structured", "sparsity": 0.5},
        # vision LoRA wraps Linear layers only: on a ResNet that is the classifier
        {"type": "lora", "objective": "sft", "steps": 2, "batch_size": 8, "r": 4, "data": digits,
         "target_modules": ["classifier.1"]},
        {"type": "evaluate", "data": digits},
        {"type": "benchmark", "batch_sizes": [2], "repeats": 1, "warmup": 0, "memory": False}]})
    report = run_recipe(recipe, tmp_path / "c", show_progress=False)
    prune, lora, evaluate, bench = (s["data"] for s in report["stages"])
    assert prune["weights_after"]["parameters"] < prune["weights_before"]["parameters"]
    assert lora["steps"] == 2
    assert 0 <= evaluate["compressed"]["digits"]["acc"] <= 1 and "acc" in evaluate["original"]["digits"]
    assert bench["compressed"]["images_per_s_bs2"] > 0 and bench["original"]["images_per_s_bs2"] > 0


def test_batchnorm_statistics_are_re_estimated_on_the_calibration_images(tmp_path, resnet):
    from llmcompress.vision.prune_conv import recalibrate_batchnorm_

    ctx, result = _prune(tmp_path, resnet, sparsity=0.5, bn_calibration={"source": "builtin:digits",
                                                                          "split": "train", "samples": 32})
    assert result.data["bn_calibration"]["images"] == 32 and result.data["bn_calibration"]["batchnorms"] == 6
    model = ctx.current.load()[0]
    x = digits_pixels(resnet, 16)
    recalibrate_batchnorm_(model, x, batch_size=16)  # one batch: the running stats are that batch's statistics
    stem = model.resnet.embedder.embedder
    with torch.no_grad():
        h = stem.convolution(x)
    assert torch.allclose(stem.normalization.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(stem.normalization.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    assert stem.normalization.momentum == 0.1 and not model.training
    _, kept = _prune(tmp_path / "stale", resnet, sparsity=0.5, bn_calibration=None)
    assert "bn_calibration" not in kept.data
