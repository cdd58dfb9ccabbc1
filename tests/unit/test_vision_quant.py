"""Quantizing vision models: every method that applies to Linear/Conv layers, on a tiny random ConvNeXt; what each
quantizes; folders reload to the model the run measured; VLMs keep their vision tower dense."""

from __future__ import annotations

import json

import pytest
import torch

from llmcompress.models.loading import load_model
from tests.unit.vision_helpers import digits_pixels, tiny_llava, vision_ctx

METHODS = {  # method -> (extra config, quantized layer type, covers Conv2d)
    "rtn": ({"bits": 8, "group_size": 32}, "RTNLinear", True),
    "dynamic-int8": ({}, "DynamicQuantizedLinear", False),
    "bnb-nf4": ({}, "Linear4bit", False),
    "bnb-int8": ({}, "Linear8bitLt", False),
    "hqq": ({"bits": 8, "group_size": 32}, "HQQLinear", False),
    "torchao-int8wo": ({}, "Linear (torchao Int8Tensor)", False),
    "torchao-int8dq": ({}, "Linear (torchao Int8Tensor)", False),
    "torchao-int4wo": ({"group_size": 32}, "Linear (torchao Int4OpaqueTensor)", False),
}


@pytest.fixture(scope="module")
def convnext():
    from llmcompress.vision.tiny import tiny_vision

    return tiny_vision("convnext")


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_quantizes_the_linear_layers_and_reloads(tmp_path, convnext, method):
    extra, layer_type, convs = METHODS[method]
    ctx = vision_ctx(tmp_path, convnext, [{"type": "quantize", "method": method, **extra}])
    result = ctx.recipe.stages[0].run(ctx)
    layers = result.data["layers"]
    linears = 4  # 2 blocks x (pwconv1, pwconv2); the classifier is the task head, left dense by default
    assert layers["quantized"][layer_type] == linears, layers
    assert layers["dense"].get("Linear") == 1 and result.data["applied_config"]["skip"][0].startswith("(.*\\.)?class")
    assert ("RTNConv2d" in layers["quantized"]) == convs and ("Conv2d" in layers["dense"]) != convs
    assert result.data["covers"] == ("Linear + Conv2d" if convs else "Linear")
    x = digits_pixels(convnext)
    original = load_model(convnext, "cpu", "float32")[0]
    in_memory = ctx.current.load()[0]
    reloaded = load_model(ctx.stage_dir / "model", "cpu", "float32")[0]
    with torch.no_grad():
        ref, ours, again = (m(pixel_values=x).logits for m in (original, in_memory, reloaded))
    assert torch.allclose(ours, again, atol=1e-5), (ours - again).abs().max()
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert 0 < rel < (0.3 if method in ("bnb-nf4", "torchao-int4wo") else 0.1), rel  # quantized, yet close
    if method != "bnb-nf4":
        assert result.data["size_bytes"] < ctx.original.size_bytes


def test_rtn_conv_matches_a_conv_with_the_dequantized_filter():
    from llmcompress.vision.layers import conv_group_size, rtn_conv_class

    torch.manual_seed(0)
    for conv in (torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)):
        gs = conv_group_size(conv, 24)
        assert gs == (24 if conv.groups == 1 else 49)  # 8 x 3 x 3 = 72 = 3 groups of 24; a 7x7 depthwise filter: 49
        q = rtn_conv_class().from_conv(conv, bits=8, group_size=gs, symmetric=False)
        x = torch.randn(2, conv.in_channels, 9, 9)
        w = q.dequantize()
        assert w.shape == conv.weight.shape and (w - conv.weight).abs().max() < conv.weight.abs().max() / 100
        expected = torch.nn.functional.conv2d(x, w, conv.bias, padding=conv.padding, groups=conv.groups)
        assert torch.allclose(q(x), expected, atol=1e-6)


def test_dynamic_int8_on_an_llm_too(make_ctx):
    ctx = make_ctx([{"type": "quantize", "method": "dynamic-int8", "skip": ["lm_head"]}])
    result = ctx.recipe.stages[0].run(ctx)
    assert result.data["quantized_modules"] == 14  # 2 layers x 7 linear layers
    model, tok = ctx.current.load()
    reloaded = load_model(ctx.stage_dir / "model", "cpu", "bfloat16")[0]
    ids = tok("quantize the model", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize("method,extra,layer", [("rtn", {"group_size": 32}, "RTNLinear"),
                                                ("hqq", {"group_size": 32}, "HQQLinear"),
                                                ("bnb-nf4", {}, "Linear4bit")])
def test_vlm_quantizes_the_language_part_only(tmp_path, method, extra, layer):
    from llmcompress import load_recipe, run_recipe

    folder = tiny_llava(tmp_path / "llava")
    recipe = load_recipe({"name": "vlm", "model": str(folder), "threads": 1, "dtype": "bfloat16",
                          "stages": [{"type": "quantize", "method": method, **extra}]})
    report = run_recipe(recipe, tmp_path / "run", show_progress=False)
    data = report["stages"][0]["data"]
    assert data["vision_modules"]["changed"] == [] and data["vision_modules"]["dense"] >= 10
    assert data["quantized_modules"] == 14  # the language model's 2 layers x 7; lm_head skipped as for an LLM
    model, tok = load_model(tmp_path / "run" / "01-quantize" / "model", "cpu", "bfloat16")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if not list(m.children())}
    assert {kinds[n] for n in kinds if n.startswith("model.language_model.layers.0.mlp.")} == {layer, "SiLUActivation"}
    assert all(kinds[n] not in ("RTNLinear", "HQQLinear", "Linear4bit") for n in kinds
               if n.startswith(("model.vision_tower", "model.multi_modal_projector")))
    with torch.no_grad():
        assert model(input_ids=tok("a photo of", return_tensors="pt").input_ids).logits.isfinite().all()


def test_bnb_4bit_layers_bnb_cannot_repack_for_avx512_bf16_keep_the_plain_path(convnext, monkeypatch):
    # bitsandbytes 0.50.2 repacks Linear4bit weights on the first CPU inference forward where the CPU has
    # AVX512-BF16, and fails on a layer 32 wide (shape '[128, 0]'); the loader leaves such layers on the plain path.
    # The CPU's answer is forced to yes, so this checks the same thing on every machine (no forward is run).
    import bitsandbytes.nn.modules as bnb_modules
    from transformers import BitsAndBytesConfig

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = load_model(convnext, "cpu", "float32",
                       quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))[0]
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    packable = {(m.in_features, m.out_features): m.in_features % 64 == 0 and m.out_features % 32 == 0 for m in layers}
    assert set(packable.values()) == {True, False}  # the tiny ConvNeXt has both kinds (32->128 cannot, 128->32 can)
    assert all(m.support_avx512bf16_for_cpu == packable[m.in_features, m.out_features] for m in layers)


def test_dynamic_int8_folder_on_cuda_and_a_truncated_folder_fail_with_the_fix(tmp_path, convnext):
    import shutil

    from llmcompress.errors import LLMCompressError

    ctx = vision_ctx(tmp_path, convnext, [{"type": "quantize", "method": "dynamic-int8"}])
    ctx.recipe.stages[0].run(ctx)
    folder = ctx.current.path
    with pytest.raises(LLMCompressError, match="run on the CPU only.*Fix: use `device: cpu`"):
        load_model(folder, "cuda", "float32")
    broken = tmp_path / "broken"
    shutil.copytree(convnext, broken)
    from safetensors.torch import load_file, save_file

    state = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in state.items() if "classifier" not in k}, broken / "model.safetensors",
              metadata={"format": "pt"})
    meta = json.loads((broken / "llmcompress.json").read_text())
    (broken / "llmcompress.json").write_text(json.dumps({**meta, "format": "structured"}))
    with pytest.raises(LLMCompressError, match="weights do not fit its config.*Fix:"):
        load_model(broken, "cpu", "float32")
