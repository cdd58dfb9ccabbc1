"""Low-rank factorization (prune method `lowrank`) on the tiny model and on synthetic layers: the factorization is
exact at full rank, whitening lowers the layer's output error against plain SVD, the parameter target is met within a
layer's rank step, the saved folder reloads in a fresh process as the model the run measured (and plain
transformers refuses it), and the errors a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from llmcompress.errors import RecipeError
from llmcompress.prune.lowrank import LowRankConfig, plan_for_target, removed, saves
from llmcompress.prune.lowrank_layers import LowRankLinear, factorize, input_grams, whitening_factor
from llmcompress.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_CAL = {"source": "builtin:pydoc", "samples": 8, "seq_len": 64}
TEXT = "def add(a, b):\n    return a + b\n"


def _stage(**kw) -> dict:
    return {"type": "prune", "method": "lowrank", "calibration": FAST_CAL, **kw}


def _run(make_ctx, stage: dict):
    ctx = make_ctx(stages=[stage])
    return ctx, ctx.recipe.stages[0].run(ctx)


def _logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


def _out_error(w, a, b, x) -> float:
    """||(W - B A) X^T||_F: the layer's output error on the inputs X (tokens, in)."""
    return float(torch.linalg.norm((w.detach().double() - b @ a) @ x.detach().double().T))


# --- the factorization on synthetic layers ---------------------------------------------------------------------------


def test_full_rank_reproduces_the_weight_with_and_without_whitening():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    x = torch.randn(200, 32) * torch.linspace(0.1, 5, 32)
    for white in (None, whitening_factor(x.double().T @ x.double(), damp=0.01)):
        a, b = factorize(w, rank=32, white=white)
        assert a.shape == (32, 32) and b.shape == (48, 32)
        assert torch.allclose(b @ a, w.double(), atol=1e-9)


def test_low_rank_linear_computes_b_after_a_with_the_bias():
    lin = torch.nn.Linear(16, 24)
    a, b = factorize(lin.weight, rank=16)
    from llmcompress.prune.lowrank_layers import low_rank_pair

    pair = low_rank_pair(lin, a, b)
    assert isinstance(pair, LowRankLinear) and pair.lowrank_b.bias is not None
    x = torch.randn(5, 16)
    assert torch.allclose(pair(x), lin(x), atol=1e-5)


def test_whitening_beats_plain_svd_on_skewed_inputs():
    """Input channels of very different scale: plain SVD keeps the weights' largest directions, whitening the
    outputs' — on the inputs it was whitened on its output error must be far lower at the same rank."""
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    x = torch.randn(1000, 64) * torch.logspace(-2, 1, 64)
    gram = x.double().T @ x.double()
    plain = _out_error(w, *factorize(w, 16), x)
    white = _out_error(w, *factorize(w, 16, whitening_factor(gram, 1e-6)), x)
    assert white < 0.5 * plain


def test_whitening_lowers_the_output_error_on_the_tiny_models_calibration_inputs(tiny_model_dir):
    from llmcompress.data import CalibrationConfig, load_calibration
    from llmcompress.models.loading import load_model

    model, tok = load_model(tiny_model_dir, "cpu", "float32")
    ids = load_calibration(CalibrationConfig(**FAST_CAL), tok, None)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        lin = model.get_submodule(name)
        xs: list[torch.Tensor] = []
        handle = lin.register_forward_hook(lambda m, args, out: xs.append(args[0].reshape(-1, m.in_features)))
        grams = input_grams({name: lin}, lambda: model(input_ids=ids))
        handle.remove()
        x = torch.cat(xs)
        assert torch.allclose(grams[name], x.double().T @ x.double(), rtol=1e-6)
        rank = min(lin.weight.shape) // 4
        plain = _out_error(lin.weight, *factorize(lin.weight, rank), x)
        white = _out_error(lin.weight, *factorize(lin.weight, rank, whitening_factor(grams[name], 0.01)), x)
        assert white < plain, (name, white, plain)


def test_a_layer_left_whole_still_hands_its_output_to_the_next(tiny_model_dir):
    """Whitening layer by layer with layer 0 skipped: layer 1 is factorized on what layer 0 outputs (measured here with
    hooks on the unchanged model), not on layer 0's own inputs (the walk once kept those when a layer had no target)."""
    from llmcompress.data import CalibrationConfig, load_calibration
    from llmcompress.models.loading import load_model
    from llmcompress.prune.lowrank_layers import factorize_model_

    model, tok = load_model(tiny_model_dir, "cpu", "float32")
    ids = load_calibration(CalibrationConfig(**FAST_CAL), tok, None)
    name = "model.layers.1.self_attn.q_proj"
    lin = model.get_submodule(name)
    weight = lin.weight.detach().clone()
    grams = input_grams({name: lin}, lambda: model(input_ids=ids, use_cache=False))
    rank = min(weight.shape) // 4
    a, b = factorize(weight, rank, whitening_factor(grams[name], 0.01))
    factorize_model_(model, {name: rank}, ids, 0.01)
    pair = model.get_submodule(name)
    assert isinstance(pair, LowRankLinear)
    assert torch.allclose(pair(torch.eye(weight.shape[1])), (b @ a).T.float(), atol=1e-4)


# --- planning ranks for a parameter target ---------------------------------------------------------------------------

SMOLLM2 = {  # SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64, MLP 1536; 134,515,008 parameters (tied)
    f"model.layers.{i}.{n}": s for i in range(30) for n, s in (
        ("self_attn.q_proj", (576, 576)), ("self_attn.k_proj", (192, 576)), ("self_attn.v_proj", (192, 576)),
        ("self_attn.o_proj", (576, 576)), ("mlp.gate_proj", (1536, 576)), ("mlp.up_proj", (1536, 576)),
        ("mlp.down_proj", (576, 1536)))}


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2, 0.3])
def test_the_target_is_met_within_one_layers_rank_step(target):
    total = 134_515_008
    ranks = plan_for_target(SMOLLM2, total, target)
    got = removed(ranks, SMOLLM2)
    assert got >= target * total
    assert got - target * total < max(sum(s) for s in SMOLLM2.values())  # one rank of the widest layer
    assert all(saves(r, SMOLLM2[n]) for n, r in ranks.items())
    fractions = {r / min(SMOLLM2[n]) for n, r in ranks.items()}
    assert max(fractions) - min(fractions) < 0.02  # one uniform fraction, up to rounding and one extra rank


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
def test_params_allocation_takes_the_same_share_of_every_layers_weights(target):
    total = 134_515_008
    ranks = plan_for_target(SMOLLM2, total, target, "params")
    got = removed(ranks, SMOLLM2)
    assert target * total <= got < target * total + max(sum(s) for s in SMOLLM2.values())
    assert set(ranks) == set(SMOLLM2)  # q_proj and o_proj too (the rank allocation leaves them dense)
    kept = {r * sum(SMOLLM2[n]) / (SMOLLM2[n][0] * SMOLLM2[n][1]) for n, r in ranks.items()}
    assert max(kept) - min(kept) < 0.01  # one share of the weights kept, up to a rank's rounding
    by_rank = plan_for_target(SMOLLM2, total, target, "rank")
    # at 10% and 20% one rank fraction leaves the square q_proj/o_proj dense (they pay only below half their rank)
    assert len(by_rank) == (len(ranks) - 60 if target <= 0.2 else len(ranks))


def test_an_unreachable_target_is_refused_with_the_most_that_can_go():
    with pytest.raises(RecipeError, match=r"removes only .* Fix: use a target below 0\.\d\d"):
        plan_for_target(SMOLLM2, 134_515_008, 0.9)  # the 28M-parameter embedding alone is 21%


# --- the stage on the tiny model -------------------------------------------------------------------------------------


def test_prune_lowrank_then_evaluate_finishes_and_reports(tmp_path):
    from llmcompress.pipeline import run_recipe

    raw = {"name": "lr", "model": "tiny-random-llama", "threads": 1, "stages": [
        _stage(target=0.2),
        {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 256, "ctx_len": 128, "stride": 64}}]}
    report = run_recipe(load_recipe(raw), tmp_path / "run", show_progress=False)
    prune, evaluate = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    data = prune["data"]
    assert data["whitening"] is True and data["calibration"]["tokens"] == 8 * 64
    widest = max(a + b for a, b in [(64, 64), (32, 64), (64, 256)])  # tiny-random-llama's layer shapes, generously
    assert 0.2 <= data["removed_share"] < 0.2 + widest / data["params_before"]
    assert data["params_before"] - data["params_after"] == round(data["removed_share"] * data["params_before"])
    assert data["ranks"]["factorized_modules"] == 14 and not data["left_dense"]
    assert report["models"]["compressed"]["meta"]["format"] == "lowrank"
    assert report["models"]["compressed"]["size_bytes"] < report["models"]["original"]["size_bytes"]
    assert evaluate["data"]["compressed"]["kl"]["kl_mean"] > 0  # evaluated the factorized model, not the original
    assert "params" in prune["summary"]["method"] and "(-20." in prune["summary"]["parameters"]


FRESH = textwrap.dedent("""
    import json, sys, torch
    from llmcompress.models.loading import load_model
    folder, out = sys.argv[1], sys.argv[2]
    model, tok = load_model(folder, "cpu", "bfloat16")
    with torch.no_grad():
        logits = model(**tok({text!r}, return_tensors="pt")).logits.float()
    torch.save(logits, out)
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        print(json.dumps({{"plain": "loaded"}}))
    except Exception as e:
        print(json.dumps({{"plain": "refused", "error": str(e)}}))
""").format(text=TEXT)


@pytest.mark.parametrize("whitening", [True, False])
def test_the_folder_reloads_in_a_fresh_process_as_measured_and_plain_transformers_refuses(make_ctx, tmp_path,
                                                                                           whitening):
    ctx, result = _run(make_ctx, _stage(rank_fraction=0.5, whitening=whitening))
    assert (result.data["calibration"] is not None) == whitening
    meta = ctx.current.meta
    assert meta["format"] == "lowrank" and meta["lowrank"]["whitening"] == whitening
    # half the rank of a square 64 x 64 layer (q_proj, o_proj) is no smaller as a pair: those stay dense
    assert {n.split(".")[-1] for n in result.data["left_dense"]} == {"q_proj", "o_proj"}
    model, tok = ctx.current.load()  # the in-memory model the run measures
    pairs = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert pairs == meta["lowrank"]["modules"] and len(pairs) == 10
    proc = subprocess.run([sys.executable, "-c", FRESH, str(ctx.current.path), str(tmp_path / "l.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "l.pt"), _logits(model, tok))
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["plain"] == "refused" and "quant_method" in plain["error"]
    config = json.loads((ctx.current.path / "config.json").read_text())
    assert config["quantization_config"]["llmcompress_format"] == "lowrank"  # says how to load it
    orig, _ = ctx.original.load()
    assert not torch.equal(_logits(orig, tok), _logits(model, tok))


def test_whitened_and_plain_runs_differ_and_whitening_stays_closer_to_the_original(make_ctx):
    """The same ranks both ways; on the tiny random model, the whitened one is closer to the original's logits."""
    out = {}
    for whitening in (True, False):
        ctx, result = _run(make_ctx, _stage(target=0.3, whitening=whitening))
        model, tok = ctx.current.load()
        orig, _ = ctx.original.load()
        out[whitening] = (result.data["ranks"], float((_logits(model, tok) - _logits(orig, tok)).norm()))
        import shutil

        shutil.rmtree(ctx.run_dir)
    assert out[True][0] == out[False][0]
    assert out[True][1] < out[False][1]


def test_an_unreachable_target_is_refused_before_calibration(make_ctx, monkeypatch):
    import llmcompress.data

    monkeypatch.setattr(llmcompress.data, "load_calibration", lambda *a, **k: pytest.fail("calibrated anyway"))
    with pytest.raises(RecipeError, match="Fix: use a target below"):
        _run(make_ctx, _stage(target=0.95))


@pytest.mark.parametrize("stage, message", [(_stage(target=0.2, skip=[".*"]), "Fix: skip fewer"),
                                            (_stage(rank_fraction=0.99), "Fix: use a lower rank_fraction")])
def test_skip_everything_and_a_rank_fraction_too_high_to_pay_are_errors(make_ctx, stage, message):
    with pytest.raises(RecipeError, match=message):
        _run(make_ctx, stage)


def test_quantizing_a_lowrank_folder_is_refused_clearly(make_ctx):
    ctx, _ = _run(make_ctx, _stage(target=0.2, whitening=False))
    cfg = load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [
        {"type": "quantize", "method": "rtn"}]}).stages[0]
    ctx.stage_dir = ctx.run_dir / "02-quantize"
    ctx.stage_dir.mkdir(parents=True)
    with pytest.raises(RecipeError, match="lowrank.*Fix"):
        cfg.run(ctx)


def test_yaml_samples_in_the_docstring_validate():
    import re

    import llmcompress.prune.lowrank as mod

    samples = re.findall(r"^\s+- (\{type: prune.*\})$", mod.__doc__, re.MULTILINE)
    assert len(samples) == 4
    for s in samples:
        stage = load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [__import__("yaml").safe_load(s)]})
        assert isinstance(stage.stages[0], LowRankConfig)
