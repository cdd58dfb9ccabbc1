"""HQQ on the tiny model: error vs bits, the stage, save/reload, skip, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("hqq")

from llmcompress.errors import RecipeError  # noqa: E402
from llmcompress.models.loading import load_model  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n"


def _logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def _run(make_ctx, **stage):
    ctx = make_ctx(stages=[{"type": "quantize", "method": "hqq", "group_size": 32, **stage}])
    return ctx, ctx.recipe.stages[0].run(ctx)


def test_weight_error_shrinks_with_bits():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 32).to(torch.bfloat16)
    w = lin.weight.detach().float().clone()
    errs = {}
    for bits in (2, 3, 4, 8):
        q = HQQLinear(copy.deepcopy(lin), BaseQuantizeConfig(nbits=bits, group_size=32), compute_dtype=torch.bfloat16,
                      device="cpu")  # del_orig deletes the copy's weights, `lin` stays intact
        errs[bits] = (q.dequantize().float() - w).abs().mean().item()
    assert errs[2] > errs[3] > errs[4] > errs[8]
    # 8 bits: the mean error must stay under one quantization step of the widest group (max - min over 255 levels)
    assert errs[8] < (w.max() - w.min()).item() / 255


def test_hqq_stage_saves_a_smaller_model_that_reloads_identically(make_ctx):
    ctx, result = _run(make_ctx, bits=4)
    assert result.data["quantized_modules"] == 14  # 2 layers x 7 linears; lm_head skipped by default
    assert result.data["skipped_modules"] == ["lm_head"]
    assert ctx.current.meta["format"] == "hqq" and ctx.current.meta["hqq"]["bits"] == 4
    # tiny model: 4-bit linears (+ bf16 scale/zero per 32) next to a bf16 tied embedding that is a third of the weights
    assert ctx.current.size_bytes < 0.7 * ctx.original.size_bytes
    assert 0 < result.data["param_bytes"] < 0.7 * ctx.original.size_bytes

    model, tok = ctx.current.load()
    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert type(reloaded.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "HQQLinear"
    assert type(reloaded.get_submodule("lm_head")).__name__ == "Linear"
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))

    orig, _ = ctx.original.load()
    assert not any(type(m).__name__ == "HQQLinear" for m in orig.modules())  # the original is untouched
    # These logits span about -0.6..1.2; bf16 rounding alone moves them by ~0.008 and 4-bit g32 HQQ by ~0.05
    # (measured), a broken kernel or a wrong reload by O(1). 0.25 separates the two with margin.
    err = (_logits(orig, tok) - _logits(model, tok)).abs().max().item()
    assert 0 < err < 0.25


def test_plain_transformers_refuses_the_hqq_folder_instead_of_loading_random_layers(make_ctx):
    """hqq has no working transformers serialization (HqqConfig is broken upstream), so the folder is our own layout;
    transformers alone used to load it with every quantized layer missing (random weights, only newlines out). Now it
    refuses in a fresh process, and config.json says how to load it; load_model drops the marker from the config it
    returns, so a dense save of that model is plain again."""
    import subprocess
    import sys

    from llmcompress.utils.io import read_json

    ctx, _ = _run(make_ctx, bits=4)
    qc = read_json(ctx.current.path / "config.json")["quantization_config"]
    assert qc["llmcompress_format"] == "hqq" and "load_model" in qc["load_with"]
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ctx.current.path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "quant_method" in proc.stderr, proc.stderr[-1500:]
    model, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.parametrize("bits,axis", [(2, 1), (3, 0), (8, 1)])
def test_hqq_other_settings_reload_identically(make_ctx, bits, axis):
    # (the fresh-process reload is tested once, for torchao's own int4 layout: importing hqq alone takes ~10 s here)
    ctx, _ = _run(make_ctx, bits=bits, axis=axis)
    model, tok = ctx.current.load()
    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    layer = reloaded.get_submodule("model.layers.1.self_attn.o_proj")
    assert (layer.meta["nbits"], layer.meta["axis"]) == (bits, axis)
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))


def test_hqq_run_in_fp32_reloads_in_fp32_and_bf16(make_ctx):
    # CPUs without native bf16 run in fp32 while dense parts are saved in the original's bf16: the loader must bring
    # both HQQ's tensors and the dense parts to the dtype asked for
    ctx = make_ctx(stages=[{"type": "quantize", "method": "hqq", "group_size": 32}], dtype="float32")
    ctx.recipe.stages[0].run(ctx)
    model, tok = ctx.current.load()
    same, _ = load_model(ctx.current.path, "cpu", "float32")
    assert torch.equal(_logits(model, tok), _logits(same, tok))
    bf16, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert (_logits(model, tok) - _logits(bf16, tok)).abs().max() < 0.05  # bf16 rounding only (measured 0.006)


def test_hqq_skip_by_regex_and_quantized_lm_head(make_ctx):
    ctx, result = _run(make_ctx, skip=[r"model\.layers\.0\..*"])  # lm_head no longer skipped
    assert result.data["quantized_modules"] == 8  # layer 1's 7 linears + lm_head
    reloaded, tok = load_model(ctx.current.path, "cpu", "bfloat16")
    assert type(reloaded.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear"
    assert type(reloaded.get_submodule("model.layers.1.mlp.up_proj")).__name__ == "HQQLinear"
    assert type(reloaded.get_submodule("lm_head")).__name__ == "HQQLinear"
    assert reloaded.config.tie_word_embeddings is False  # the embedding stays bf16, lm_head is quantized
    model, _ = ctx.current.load()
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))


def test_hqq_group_size_must_divide_width(make_ctx):
    with pytest.raises(RecipeError, match=r"group_size 48 does not divide the input width 64 of `model\..*` .* Fix"):
        _run(make_ctx, group_size=48)


@pytest.mark.parametrize("field,value,message", [
    ("bits", 5, r"bits"), ("group_size", 12, r"multiple of 8"), ("axis", 2, r"axis"),
])
def test_hqq_bad_settings_fail_when_the_recipe_loads(field, value, message):
    from llmcompress.recipe import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe({"name": "x", "model": "tiny-random-llama",
                     "stages": [{"type": "quantize", "method": "hqq", field: value}]})


def test_hqq_without_the_extra_fails_before_loading(monkeypatch):
    import importlib.util

    from llmcompress.errors import MissingExtraError
    from llmcompress.quant.hqq import HQQConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install -c constraints.txt 'llmcompress\[hqq\]'"):
        HQQConfig().preflight()
