"""Pruning on the tiny model and on synthetic layers: achieved sparsity, N:M patterns, skipping, Wanda vs magnitude,
save/reload, and the errors a user sees."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from llmcompress.errors import RecipeError
from llmcompress.models.loading import load_model
from llmcompress.prune.base import nm_pattern_holds, prune_mask
from llmcompress.prune.magnitude import MagnitudeConfig
from llmcompress.prune.wanda import WandaConfig, wanda_score
from llmcompress.recipe import load_recipe

FAST_CAL = {"samples": 8, "seq_len": 64}  # 512 calibration tokens: the tiny model prunes in about a second


def _logits(model, tokenizer, text="def add(a, b):\n    return a + b\n"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def _stage(method: str, **kw) -> dict:
    extra = {"calibration": FAST_CAL} if method == "wanda" else {}
    return {"type": "prune", "method": method, **extra, **kw}


def _run(make_ctx, stage: dict):
    ctx = make_ctx(stages=[stage])
    return ctx, ctx.recipe.stages[0].run(ctx)


def _run_next(ctx, stage: dict, folder: str, on_original: bool = False):
    """Run one more stage config on ``ctx`` in a fresh stage folder (make_ctx builds one context per test)."""
    cfg = load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [stage]}).stages[0]
    ctx.stage_dir = ctx.run_dir / folder
    ctx.stage_dir.mkdir(parents=True)
    if on_original:
        ctx.current = ctx.original
    return cfg.run(ctx)


def _linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# --- masks on synthetic scores ---------------------------------------------------------------------------------------


def test_mask_counts_are_exact_even_with_tied_scores():
    score = torch.ones(6, 40)  # all tied: a threshold would prune all or nothing
    cfg = MagnitudeConfig(sparsity=0.3)
    assert prune_mask(score, cfg, per_row=False).sum() == round(0.3 * 240)
    assert (prune_mask(score, cfg, per_row=True).sum(1) == 12).all()


def test_nm_mask_prunes_the_lowest_of_each_group():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 9.0, 8.0]])
    mask = prune_mask(score, MagnitudeConfig(pattern="2:4"), per_row=True)
    assert mask.tolist() == [[False, True, False, True, True, True, False, False]]
    w = torch.randn(16, 32).masked_fill(prune_mask(torch.rand(16, 32), MagnitudeConfig(pattern="1:4"), True), 0)
    assert nm_pattern_holds(w, 1, 4) and not nm_pattern_holds(torch.randn(16, 32), 1, 4)


# --- the stage on the tiny model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_unstructured_sparsity_matches_request(make_ctx, method, sparsity):
    ctx, result = _run(make_ctx, _stage(method, sparsity=sparsity))
    stats = result.data["sparsity"]
    # Each row (wanda) or layer (magnitude) prunes round(s * n) weights, n >= 64 here: at most 0.5/64 off the request.
    # Weights that were zero already (none in the tiny model's pruned layers: checked) would only add to it.
    assert stats["zeros_before"] == 0
    assert abs(stats["pruned_layers"] - sparsity) <= 0.5 / 64
    assert all(abs(v - sparsity) <= 0.5 / 64 for v in stats["by_type"].values())
    assert set(stats["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # recount independently: all linear weights include the skipped (tied) lm_head, which has no new zeros
    model, _ = ctx.current.load()
    lin = _linears(model)
    zeros = sum(int((m.weight == 0).sum()) for n, m in lin.items() if n != "lm_head")
    total = sum(m.weight.numel() for n, m in lin.items() if n != "lm_head")
    assert zeros / total == pytest.approx(stats["pruned_layers"])
    lm_zeros = int((lin["lm_head"].weight == 0).sum())
    assert stats["all_linear"] == pytest.approx((zeros + lm_zeros) / (total + lin["lm_head"].weight.numel()))
    assert result.data["prune_seconds"] > 0 and "zeros stored dense" in result.summary["size"]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_is_exactly_half_group_by_group(make_ctx, method):
    ctx, result = _run(make_ctx, _stage(method, pattern="2:4"))
    assert result.data["sparsity"]["pruned_layers"] == 0.5 and result.data["pattern_holds"] is True
    model, _ = ctx.current.load()
    for name in result.data["sparsity"]["by_type"]:
        assert result.data["sparsity"]["by_type"][name] == 0.5
    for name, lin in _linears(model).items():
        if name == "lm_head":
            continue
        groups = (lin.weight.reshape(lin.out_features, -1, 4) == 0).sum(-1)
        assert (groups == 2).all(), name  # exactly 2 zeros in every group of 4 (no zeros before)


def test_default_skip_keeps_lm_head_and_embeddings(make_ctx):
    ctx, _ = _run(make_ctx, _stage("magnitude", sparsity=0.5))
    model, _ = ctx.current.load()
    orig, _ = ctx.original.load()
    assert torch.equal(model.lm_head.weight, orig.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight, orig.model.embed_tokens.weight)
    assert not any((m.weight == 0).any() for m in _linears(orig).values() if m is not orig.lm_head)  # untouched


def test_skip_by_regex(make_ctx):
    ctx, result = _run(make_ctx, _stage("wanda", sparsity=0.5, skip=["lm_head", r"model\.layers\.0\..*"]))
    assert result.data["sparsity"]["pruned_modules"] == 7
    model, _ = load_model(ctx.current.path)
    orig = _linears(ctx.original.load()[0])
    for name, lin in _linears(model).items():
        skipped = name == "lm_head" or name.startswith("model.layers.0.")
        assert torch.equal(lin.weight, orig[name].weight) == skipped, name
        assert skipped or (lin.weight == 0).float().mean() == 0.5, name


def test_pruning_a_tied_lm_head_unties_it(make_ctx):
    ctx, result = _run(make_ctx, _stage("wanda", sparsity=0.5, skip=[]))
    assert result.data["untied"] == ["lm_head"] and "lm_head" in result.data["sparsity"]["by_type"]
    model, tok = ctx.current.load()
    orig, _ = ctx.original.load()
    assert torch.equal(model.model.embed_tokens.weight, orig.model.embed_tokens.weight)  # the embedding is whole
    zeros_before = (orig.lm_head.weight == 0).float().mean().item()  # the padding token's row of the embedding
    assert 0.5 <= result.data["sparsity"]["by_type"]["lm_head"] <= 0.5 + zeros_before
    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))


@pytest.mark.parametrize("stage", [_stage("magnitude", sparsity=0.5), _stage("wanda", pattern="2:4")])
def test_saved_model_reloads_with_identical_logits(make_ctx, stage):
    ctx, result = _run(make_ctx, stage)
    assert result.model_dir == "model" and ctx.current.path == ctx.stage_dir / "model"
    meta = ctx.current.meta
    assert meta["format"] == "hf" and meta["method"] == stage["method"] and meta["config"]["method"] == stage["method"]
    assert ctx.current.size_bytes == pytest.approx(ctx.original.size_bytes, rel=0.01)  # dense: no smaller on disk
    model, tok = ctx.current.load()
    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))
    orig, _ = ctx.original.load()
    assert not torch.equal(_logits(orig, tok), _logits(model, tok))


# --- Wanda vs magnitude ----------------------------------------------------------------------------------------------


def test_wanda_provably_beats_magnitude_on_a_layer_with_skewed_inputs():
    """With orthogonal input channels, the output error of a mask is sum_ij (W_ij * ||X_j||)^2 over pruned weights,
    which Wanda's choice minimises within every row / N:M group. Skewed channel norms make magnitude's choice differ."""
    torch.manual_seed(0)
    n_tokens, d_in, d_out = 256, 64, 32
    q, _ = torch.linalg.qr(torch.randn(n_tokens, d_in))  # orthonormal columns
    norms = torch.logspace(-1, 1, d_in)[torch.randperm(d_in)]  # channel norms from 0.1 to 10
    x = q * norms  # (tokens, in): ||X_j|| = norms[j], columns orthogonal
    w = torch.randn(d_out, d_in)
    norms_sq = (x * x).sum(0)
    for cfg in (WandaConfig(pattern="2:4"), WandaConfig(sparsity=0.5)):
        errors = {}
        for name, score in (("wanda", wanda_score(w, norms_sq)), ("magnitude", w.abs())):
            mask = prune_mask(score, cfg, per_row=True)
            errors[name] = ((x @ (w * mask).T) ** 2).sum().item()  # ||X W^T - X W_pruned^T||^2
        assert errors["wanda"] < 0.5 * errors["magnitude"], (cfg.describe(), errors)


def test_wanda_differs_from_magnitude_and_keeps_outputs_closer_on_calibration_text(make_ctx, tiny_model_dir,
                                                                                   tmp_path):
    # A random tiny model has no outlier channels; scale a few input channels of every layer's RMSNorm (as trained
    # LLMs have) so activation norms are skewed, then measure the logits' error on the calibration windows.
    ctx = make_ctx(stages=[_stage("wanda", sparsity=0.5)])
    orig, tok = ctx.original.load()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in orig.named_modules():
            if name.endswith("layernorm"):
                scale = torch.where(torch.rand(mod.weight.shape, generator=g) < 0.1, 20.0, 1.0)
                mod.weight.mul_(scale.to(mod.weight.dtype))
    import shutil

    from llmcompress.context import ModelHandle
    from llmcompress.data import load_calibration

    skewed = tmp_path / "skewed"  # stages load their model from its folder: the skewed one is saved as the original
    orig.save_pretrained(skewed)
    tok.save_pretrained(skewed)
    shutil.copy2(tiny_model_dir / "llmcompress.json", skewed / "llmcompress.json")
    ctx.original = ctx.current = ModelHandle("original", skewed, ctx.runtime)
    orig, tok = ctx.original.load()

    ids = load_calibration(ctx.recipe.stages[0].calibration, tok, model=ctx.original)  # builtin:mixed
    with torch.no_grad():
        ref = orig(input_ids=ids).logits.float()
    errors, masks = {}, {}
    for method in ("magnitude", "wanda"):
        _run_next(ctx, _stage(method, sparsity=0.5), f"prune-{method}", on_original=True)  # the skewed model
        pruned, _ = ctx.current.load()
        with torch.no_grad():
            errors[method] = ((pruned(input_ids=ids).logits.float() - ref) ** 2).mean().item()
        masks[method] = pruned.model.layers[1].mlp.down_proj.weight == 0
    assert not torch.equal(masks["wanda"], masks["magnitude"])
    assert errors["wanda"] < errors["magnitude"], errors


# --- errors ----------------------------------------------------------------------------------------------------------


def _error(stage: dict) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [stage]})
    return str(e.value)


def test_bad_configs_are_rejected_with_clear_messages():
    msg = _error({"type": "prune", "method": "magnitude", "sparsity": 1.5})
    assert "stages[0] (prune): `sparsity`: must be a fraction strictly between 0 and 1" in msg and "got 1.5" in msg
    msg = _error({"type": "prune", "method": "wanda", "pattern": "4:2"})
    assert "`pattern`: N and M must satisfy 0 < N < M" in msg and "got '4:2'" in msg
    assert "must be \"N:M\"" in _error({"type": "prune", "method": "wanda", "pattern": "2of4"})
    msg = _error({"type": "prune", "method": "wanda", "pattern": "2:4", "sparsity": 0.5})
    assert "set exactly one of `sparsity`" in msg and "both are set" in msg
    assert "neither is set" in _error({"type": "prune", "method": "magnitude"})
    msg = _error({"type": "prune", "method": "wandda", "sparsity": 0.5})
    assert "unknown method `wandda`" in msg and "Did you mean `wanda`?" in msg and "magnitude" in msg
    msg = _error({"type": "prune", "method": "magnitude", "sparsity": 0.5, "calibration": {}})
    assert "unknown key `calibration`" in msg  # magnitude needs no data
    msg = _error(_stage("wanda", sparsity=0.5, calibration={"source": "builtin:pydc"}))
    assert "`calibration.source`: unknown source `builtin:pydc`. Did you mean `builtin:pydoc`?" in msg


def test_unquoted_pattern_in_yaml_says_to_quote_it(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\nmodel: tiny-random-llama\nstages:\n  - {type: prune, method: wanda, pattern: 2:4}\n")
    with pytest.raises(RecipeError, match=r'write the pattern in quotes, e\.g\. pattern: "2:4"'):
        load_recipe(f)


def test_pattern_must_divide_every_input_width(make_ctx):
    with pytest.raises(RecipeError, match=r'pattern "3:5": M = 5 does not divide the input width 64 of .*Fix'):
        _run(make_ctx, _stage("magnitude", pattern="3:5"))


def test_skip_everything_is_an_error(make_ctx):
    with pytest.raises(RecipeError, match="leaves no linear layer to prune"):
        _run(make_ctx, _stage("magnitude", sparsity=0.5, skip=[".*"]))


def test_a_quantized_model_is_refused(make_ctx):
    ctx, _ = _run(make_ctx, {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32})
    with pytest.raises(RecipeError, match=r"already quantized \(`rtn`\).*Fix: prune before quantizing"):
        _run_next(ctx, _stage("magnitude", sparsity=0.5), "02-prune")


def test_calibration_file_errors(make_ctx, tmp_path):
    ctx = make_ctx()
    missing = tmp_path / "nope.txt"
    with pytest.raises(RecipeError, match=r"calibration.source .*: no such file .*nope.txt"):
        _run_next(ctx, _stage("wanda", sparsity=0.5, calibration={"source": str(missing)}), "a")
    short = tmp_path / "short.txt"
    short.write_text("just a few words " * 20)
    with pytest.raises(RecipeError, match=r"which make \d windows of seq_len 64, but samples=8 .* Fix"):
        cal = {**FAST_CAL, "source": str(short), "skip_tokens": 0}
        _run_next(ctx, _stage("wanda", sparsity=0.5, calibration=cal), "b")


def test_calibration_from_a_text_file_is_used(make_ctx, tmp_path):
    from llmcompress.models.tiny import corpus_text

    text = tmp_path / "cal.txt"
    text.write_text(corpus_text()[-20_000:])
    cal = {**FAST_CAL, "source": str(text), "skip_tokens": 0}
    _, a = _run(make_ctx, _stage("wanda", sparsity=0.5, calibration=cal))
    assert a.data["calibration"]["tokens"] == 8 * 64 and a.data["calibration"]["source"] == str(text)


def test_a_bf16_checkpoint_run_in_float32_is_saved_in_bf16(make_ctx):
    # dtype auto is float32 on CPUs without native bf16: the pruned model must not come out twice the source's size
    ctx = make_ctx(stages=[_stage("wanda", pattern="2:4")], dtype="float32")
    result = ctx.recipe.stages[0].run(ctx)
    from llmcompress.models.loading import storage_dtype_of

    assert result.data["saved_dtype"] == storage_dtype_of(ctx.current.path) == "bfloat16"
    assert ctx.current.size_bytes == pytest.approx(ctx.original.size_bytes, rel=0.01)
    model, tok = ctx.current.load()
    assert model.dtype == torch.float32  # back in the run's dtype after saving
    reloaded, _ = load_model(ctx.current.path, "cpu", "float32")
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))  # bf16 storage lost nothing


# --- docs ------------------------------------------------------------------------------------------------------------


def test_yaml_samples_in_docstrings_validate():
    import yaml

    from llmcompress.prune import PRUNERS

    for name in PRUNERS.names():
        cls = PRUNERS.get(name)
        doc = (cls.__doc__ or "") + (sys.modules[cls.__module__].__doc__ or "")
        samples = [yaml.safe_load(s) for s in re.findall(r"\{type: prune(?:[^{}]|\{[^{}]*\})*\}", doc)]
        samples = [s for s in samples if s.get("method") == name]  # a module may document several methods
        assert samples, f"{name}: no YAML sample in its docstring"
        model = "tiny-random-convnext" if name == "structured" else "tiny-random-llama"  # vision-only method
        for s in samples:
            stage = load_recipe({"name": "x", "model": model, "stages": [s]}).stages[0]
            assert stage.method == name


def test_shipped_prune_recipes_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "recipes"
    for f, method in (("smollm2-wanda-2of4.yaml", "wanda"), ("smollm2-magnitude-50.yaml", "magnitude")):
        stage = load_recipe(root / f).stages[0]
        assert (stage.type, stage.method, stage.target_sparsity) == ("prune", method, 0.5)


def test_a_prune_run_reports_sparsity_and_resumes(tmp_path):
    import json

    from llmcompress.pipeline import run_recipe

    raw = {"name": "p", "model": "tiny-random-llama", "threads": 1, "stages": [
        _stage("wanda", pattern="2:4"),
        {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 256, "ctx_len": 128, "stride": 64}}]}
    report = run_recipe(load_recipe(raw), tmp_path / "run", show_progress=False)
    assert report["method"] == "prune:wanda"
    prune, evaluate = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    assert prune["data"]["sparsity"]["pruned_layers"] == 0.5 and prune["summary"]["method"] == "wanda 2:4"
    assert evaluate["data"]["compressed"]["kl"]["kl_mean"] > 0  # evaluated the pruned model against the original
    assert "zeros are stored dense" in report["models"]["compressed"]["meta"]["note"]
    run_recipe(load_recipe(raw), tmp_path / "run", show_progress=False)
    assert all(s["resumed"] for s in json.loads((tmp_path / "run" / "report.json").read_text())["stages"])


MIXED_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("types", [None, MIXED_TYPES])
def test_the_layer_walk_hands_each_layer_what_the_model_does(types):
    """Untouched, the layer-by-layer walk (Wanda, lowrank whitening; the LoRA stage's GPTQ refit captures its inputs
    the same way) feeds every decoder layer the hidden state the whole model feeds it, also where layers of two
    attention types get different masks (a sliding window of 8 on 32-token windows): each layer gets its own type's
    arguments, not layer 0's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmcompress.prune.layerwise import float_layers

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      **({"layer_types": types, "sliding_window": 8, "use_sliding_window": True} if types else {}))
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (10, 32))
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for i, (prefix, work, run) in enumerate(float_layers(model, ids)):
        seen: list[torch.Tensor] = []
        handle = work.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0] if args else
                                                                                kw["hidden_states"]), with_kwargs=True)
        with torch.no_grad():
            run()
        handle.remove()
        assert prefix == f"model.layers.{i}."
        assert torch.allclose(torch.cat(seen), expected[i], atol=1e-5), i
