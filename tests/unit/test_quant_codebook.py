"""Codebook (k-means, SqueezeLLM-style) quantization on the tiny model: the run, the folder, the arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmcompress.errors import RecipeError
from llmcompress.models.loading import load_model

CALIB = {"source": "builtin:pydoc", "samples": 4, "seq_len": 64}
PROBE = "def add(a, b):\n    return a + b\n"


def _stage(**kw):
    return {"type": "quantize", "method": "codebook", "calibration": CALIB, **kw}


def _logits(model, tokenizer, text=PROBE):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def _run(make_ctx, **kw):
    ctx = make_ctx(stages=[_stage(**kw)])
    return ctx, ctx.recipe.stages[0].run(ctx)


def test_codebook_then_evaluate_runs_and_reports(tmp_path):
    from llmcompress.pipeline import run_recipe
    from llmcompress.recipe import load_recipe

    raw = {"name": "cb", "model": "tiny-random-llama", "threads": 1, "stages": [
        _stage(bits=4, weighting="fisher"),
        {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 256, "ctx_len": 128, "stride": 64}}]}
    run_recipe(load_recipe(raw), tmp_path / "run", show_progress=False)
    quant, evaluate = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    # 4 bits per index + 16 fp16 centroids per row; the tiny model's rows are 64 (or, down_proj, 128) wide
    from llmcompress.models.tiny import tiny_random_llama

    orig, _ = load_model(tiny_random_llama(), "cpu", "bfloat16")
    shapes = [m.weight.shape for n, m in orig.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    expected = sum(o * i * 4 + o * 16 * 16 for o, i in shapes) / sum(o * i for o, i in shapes)
    assert quant["data"]["bits_per_weight"] == pytest.approx(expected, abs=1e-4) and 6 < expected < 8
    assert quant["data"]["quantized_modules"] == 14 and quant["data"]["calibration"]["tokens"] == 256
    assert evaluate["data"]["compressed"]["kl"]["kl_mean"] > 0  # the codebook model differs from the original


def test_folder_reloads_in_a_fresh_process_as_the_run_measured(make_ctx, tmp_path):
    ctx, result = _run(make_ctx, bits=3, weighting="fisher")
    model, tok = ctx.current.load()  # what later stages (evaluate) measure
    expected = _logits(model, tok)
    torch.save(expected, tmp_path / "expected.pt")
    code = ("import sys, torch\nfrom llmcompress.models.loading import load_model\n"
            "m, t = load_model(sys.argv[1], 'cpu', 'bfloat16')\n"
            "ids = t(sys.argv[2], return_tensors='pt')\n"
            "with torch.no_grad(): got = m(**ids).logits.float()\n"
            "exp = torch.load(sys.argv[3])\n"
            "assert torch.equal(got, exp), float((got - exp).abs().max())\n"
            "w = m.get_submodule('model.layers.0.mlp.up_proj').weight\n"
            "assert type(m.get_submodule('model.layers.0.mlp.up_proj')).__name__ == 'Linear'\n"
            "assert w.dtype == torch.bfloat16\n"
            "print('same')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ctx.current.path), PROBE, str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "same" in proc.stdout, proc.stderr[-1500:]
    assert ctx.current.meta["reload_check"]["max_abs_logit_diff"] == 0.0  # the in-memory codebook model, exactly
    orig, _ = ctx.original.load()
    assert (_logits(orig, tok) - expected).abs().max() > 0  # and it is quantized


def test_plain_from_pretrained_refuses_the_folder(make_ctx):
    ctx, _ = _run(make_ctx, bits=4, weighting="none")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ctx.current.path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "quant_method" in proc.stderr, proc.stderr[-1500:]
    model, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert not hasattr(model.config, "quantization_config")  # a dense re-save of it is plain again


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 32), (2, 16)])
def test_every_weight_is_one_of_its_codebooks_centroids(make_ctx, bits, group_size):
    from safetensors.torch import load_file

    ctx, _ = _run(make_ctx, bits=bits, group_size=group_size, weighting="activation")
    state = load_file(ctx.current.path / "model.safetensors")
    model, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    name = "model.layers.1.mlp.down_proj"
    codebook = state[f"{name}.codebook"]  # (out, groups, 2**bits) float16
    w = model.get_submodule(name).weight.float()  # (out, in)
    groups = codebook.shape[1]
    assert codebook.shape == (w.shape[0], w.shape[1] // (group_size or w.shape[1]), 2**bits)
    g = w.reshape(w.shape[0], groups, -1)  # (out, groups, group)
    centroids = codebook.to(torch.bfloat16).float()
    hit = (g[..., None] == centroids[:, :, None, :]).any(-1)
    assert hit.all()
    assert len(torch.unique(g[0, 0])) <= 2**bits
    assert f"{name}.weight" not in state and state[f"{name}.qindex"].dtype == torch.uint8


def test_weighted_kmeans_beats_plain_kmeans_on_its_weighted_error(make_ctx):
    from llmcompress.quant.codebook import CodebookConfig, codebook_fit
    from llmcompress.quant.codebook_kmeans import fisher_diagonal, weighted_error

    ctx = make_ctx(stages=[_stage()])
    model, tok = ctx.original.load()
    from llmcompress.data.calibration import load_calibration

    ids = load_calibration(CodebookConfig(calibration=CALIB).calibration, tok)
    name = "model.layers.0.mlp.gate_proj"
    lin = model.get_submodule(name)
    fisher = fisher_diagonal(model, ids, {name: lin})[name]
    assert fisher.shape == lin.weight.shape and fisher.sum() > 0
    w = lin.weight.detach().float()
    errs = {}
    for label, sens in (("fisher", fisher), ("none", None)):
        codebook, idx = codebook_fit(w, sens, 3, w.shape[1], 20)
        q = codebook.float().gather(2, idx[:, None, :]).squeeze(1)
        errs[label] = weighted_error(w, fisher, q)
    # measured 0.89x here (a random model's Fisher is nearly flat; SmolLM2's is not: see docs/notes/issue20-codebook.md)
    assert errs["fisher"] < 0.97 * errs["none"], errs


def test_packing_round_trips_and_costs_exact_bits():
    from llmcompress.quant.codebook_kmeans import layer_bits, pack_indices, unpack_indices

    torch.manual_seed(0)
    for bits in (2, 3, 4):
        idx = torch.randint(0, 2**bits, (3, 40))
        packed = pack_indices(idx, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 40 // 8 * bits)
        assert torch.equal(unpack_indices(packed, bits, 40), idx)
    # SmolLM2's gate_proj (1536 x 576), one codebook per row: 4 bits + 16 x 16 / 576 per weight
    assert layer_bits(1536, 576, 4, 576) / (1536 * 576) == pytest.approx(4 + 256 / 576)
    # 3 bits, groups of 64: 3 + 8 x 16 / 64 = 5 bits per weight
    assert layer_bits(576, 1536, 3, 64) == 576 * 1536 * 5


def test_reported_bits_per_weight_match_the_folder(make_ctx):
    from safetensors.torch import load_file

    ctx, result = _run(make_ctx, bits=3, weighting="none", group_size=32)
    state = load_file(ctx.current.path / "model.safetensors")
    stored = sum(v.numel() * v.element_size() for k, v in state.items() if k.endswith((".codebook", ".qindex")))
    assert stored == result.data["codebook_bytes"]
    assert result.data["bits_per_weight"] == pytest.approx(3 + 8 * 16 / 32)  # 7: tiny layers, small groups
    assert ctx.current.size_bytes < ctx.original.size_bytes


def test_deterministic(make_ctx, tmp_path):
    from llmcompress.quant.codebook_kmeans import weighted_kmeans

    torch.manual_seed(1)
    w, s = torch.randn(32, 96), torch.rand(32, 96)
    a, b = weighted_kmeans(w, s, 8, 10), weighted_kmeans(w, s, 8, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_group_size_that_does_not_divide_is_refused_before_any_work(make_ctx):
    with pytest.raises(RecipeError, match=r"group_size 48 does not divide the input width 64 of `model\..*Fix"):
        _run(make_ctx, group_size=48, weighting="none")


def test_the_docstring_sample_loads_as_a_recipe():
    import yaml

    import llmcompress.quant.codebook as mod
    from llmcompress.recipe import load_recipe

    lines = mod.__doc__.split("\n\n")[1]  # the indented YAML sample under the first line
    stages = yaml.safe_load(lines.replace("\n    ", "\n").strip())
    recipe = load_recipe({"name": "x", "model": "tiny-random-llama", "stages": stages})
    cfg = recipe.stages[0]
    assert (cfg.method, cfg.bits, cfg.group_size, cfg.weighting, cfg.iterations) == ("codebook", 4, None, "fisher", 20)
