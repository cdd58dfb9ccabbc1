"""Quantization-aware LoRA (``qat: true``) on the tiny model: the fake quantizer is bitsandbytes' own, the trained
forward is the requantized merge bit for bit, QAT keeps more of the recovery through the merge, and recipes that ask
for it where it cannot work are refused with the place and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from llmcompress.errors import RecipeError  # noqa: E402
from llmcompress.models.loading import load_model  # noqa: E402

TEXT = "The for statement is used to iterate over the elements of a sequence.\n"
EVAL = {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 512, "ctx_len": 128, "stride": 64}}
ROOT = Path(__file__).resolve().parents[2]


def _lora(**kw) -> dict:
    return {"type": "lora", "objective": "distill", "data": {"samples": 16, "seq_len": 64}, "r": 4, "steps": 6,
            "lr": 0.01, "qat": True, "merge": ["requantize"], **kw}


def _recipe(tiny_model_dir, stages, dtype="float32"):
    from llmcompress.recipe import load_recipe

    return load_recipe({"name": "qat-test", "model": str(tiny_model_dir), "threads": 1, "dtype": dtype,
                        "stages": stages})


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model quantized by the bnb-nf4 stage (double quantization, as the recipes use it)."""
    from llmcompress.pipeline import run_recipe

    out = tmp_path_factory.mktemp("qat-nf4")
    run_recipe(_recipe(tiny_model_dir, [{"type": "quantize", "method": "bnb-nf4"}]), out, show_progress=False)
    return out / "01-quantize" / "model"


# ---------------------------------------------------------------------------------------------------------------------
# The quantizer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fast_quantizer_is_bitsandbytes_quantize_4bit_bit_for_bit(quant_type, nested, dtype):
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    from llmcompress.lora.qat import quantize_4bit

    torch.manual_seed(0)
    w = torch.randn(96, 192) * torch.rand(96, 1) * 3
    w[0, :64] = 0  # a block of zeros
    bounds = _get_4bit_quantize_bounds(quant_type, "cpu")[0]
    w[1, :15], w[1, 15] = bounds * 0.5, 0.5  # values exactly on the rounding bounds (the block's absmax is 0.5)
    w[2, :15], w[2, 15] = torch.nextafter(bounds, torch.tensor(2.0)) * 0.25, -0.25  # and one float above them
    w = w.to(dtype)
    ref_packed, ref = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    packed, state = quantize_4bit(w, 64, quant_type, nested, torch.uint8)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref.absmax)
    assert (state.dtype, state.blocksize, state.quant_type, state.nested) == (ref.dtype, 64, quant_type, nested)
    if nested:
        assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), bnb.functional.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gptq_rounds_into_a_grid_bitsandbytes_reproduces_with_a_smaller_output_error(quant_type):
    from bitsandbytes.functional import QuantState

    from llmcompress.lora.refit import Grid, gptq

    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    x = torch.randn(512, 256) @ torch.randn(256, 256) * 0.1  # correlated inputs: where GPTQ beats plain rounding
    h = 2 * x.t() @ x / len(x)
    packed, _ = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    code = bnb.functional.get_4bit_type(quant_type, device="cpu")
    layer = type("L", (), {})()
    layer.weight = type("W", (), {"quant_state": QuantState(absmax=None, blocksize=64, quant_type=quant_type,
                                                            code=code)})()
    grid = Grid.of(layer)
    q, info = gptq(w, h, grid)
    assert info["gptq"] < 0.7 * info["rtn"]
    clipped, info_clipped = gptq(w, h, grid, clip=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7))
    assert info_clipped["gptq"] < info["gptq"]  # a searched scale: a finer grid for the rest of the block
    for result in (q, clipped):
        p2, state = bnb.functional.quantize_4bit(result, blocksize=64, compress_statistics=False,
                                                 quant_type=quant_type)
        assert torch.equal(bnb.functional.dequantize_4bit(p2, state), result)  # same scales, same codes
    scales = clipped.reshape(48, 4, 64).abs().amax(-1) / w.reshape(48, 4, 64).abs().amax(-1)
    assert (scales < 0.999).any() and (scales > 0.699).all()  # some blocks clipped, none below the floor


# ---------------------------------------------------------------------------------------------------------------------
# The trained forward is the merged model's


def _train_qat(make_ctx, nf4_dir, dtype, steps=4, **lora):
    """Train a QAT adapter as the lora stage does and keep the model in QAT mode: (ctx, cfg, prepared, losses)."""
    from llmcompress.lora import OBJECTIVES
    from llmcompress.lora.init import save_adapter
    from llmcompress.lora.train import prepare, train_loop_
    from llmcompress.models.loading import storage_dtype_of

    ctx = make_ctx(stages=[{"type": "quantize", "method": "bnb-nf4"}, _lora(steps=steps, **lora)],
                   compressed=nf4_dir, dtype=dtype)
    ctx.stage_index = 1
    cfg = ctx.recipe.stages[1]
    prep = prepare(cfg, ctx)
    losses, _, _ = train_loop_(prep.model, prep.data, OBJECTIVES.get(cfg.objective), cfg, ctx, prep.teacher,
                               prep.seed)
    save_adapter(prep.model, ctx.stage_dir / "adapter", prep.init_info, dtype=storage_dtype_of(ctx.original.path))
    return ctx, cfg, prep, losses


def _logits(model, tok, mode):
    ids = tok([TEXT, TEXT[::-1][:40]], return_tensors="pt", padding=True)
    model.eval()
    with (torch.inference_mode() if mode == "inference" else torch.no_grad()):
        return model(**ids).logits


@pytest.mark.parametrize("dtype,requantize_from,refit", [
    ("float32", "dequantized", None), ("bfloat16", "dequantized", None), ("bfloat16", "original", None),
    ("bfloat16", "original", "gptq"), ("float32", "dequantized", "gptq"),
])
def test_the_trained_forward_is_the_requantized_merge_bit_for_bit(make_ctx, nf4_dir, dtype, requantize_from, refit):
    from llmcompress.lora.merge import MergeInputs, merge_requantize

    qat = {"refit": refit, "refit_samples": 8} if refit else True
    init = "default" if refit else "loftq"
    ctx, cfg, prep, _ = _train_qat(make_ctx, nf4_dir, dtype, requantize_from=requantize_from, qat=qat, init=init)
    assert prep.qat.codes_changed() > 0  # training moved some weights across a rounding bound
    trained = {mode: _logits(prep.model, prep.tokenizer, mode) for mode in ("inference", "no_grad")}
    inputs = MergeInputs.from_context(ctx, cfg, ctx.stage_dir / "adapter", {}, refit=prep.refit)
    merge_requantize(inputs, ctx.stage_dir / "merged", ctx)
    merged, _ = load_model(ctx.stage_dir / "merged" / "model", "cpu", dtype)
    assert type(merged.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear4bit"
    for mode, ref in trained.items():
        assert torch.equal(_logits(merged, prep.tokenizer, mode), ref), mode


def test_the_straight_through_gradient_is_the_lora_gradient_at_the_quantized_forward(make_ctx, nf4_dir):
    """dL/dA and dL/dB of the QAT layer = those of a plain LoRA branch added to the fake-quantized layer's output."""
    ctx, cfg, prep, _ = _train_qat(make_ctx, nf4_dir, "float32", steps=1)
    model, qat = prep.model, prep.qat
    fake = qat.fakes[0]
    layer = fake.layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, layer.in_features)
    model.train()
    with torch.enable_grad():
        y = layer(x)
        y.square().sum().backward()
        got = a.grad.clone(), b.grad.clone()
        a.grad = b.grad = None
        y_q = qat.refresh(fake)(x).detach()  # the merged layer's output, no gradient
        assert torch.equal(y, y_q)  # the straight-through branch adds exactly zero
        (y_q + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
         - (layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]).detach()
         ).square().sum().backward()
    assert torch.allclose(got[0], a.grad) and torch.allclose(got[1], b.grad)


# ---------------------------------------------------------------------------------------------------------------------
# What training reached is what the merge ships


def _merged_loss(ctx, cfg, prep, tmp_name):
    """(distill loss of the trained model, of its requantize merge) on the first training batch, eval mode."""
    from llmcompress.lora.merge import MergeInputs, merge_requantize
    from llmcompress.lora.objectives import distill_loss

    batch = next(prep.data.batches(8, 0))
    prep.model.eval()
    with torch.no_grad():
        trained = distill_loss(prep.model, batch, teacher=prep.teacher).item()
    inputs = MergeInputs.from_context(ctx, cfg, ctx.stage_dir / "adapter", {}, refit=prep.refit)
    merge_requantize(inputs, ctx.stage_dir / tmp_name, ctx)
    merged = load_model(ctx.stage_dir / tmp_name / "model", "cpu", ctx.runtime.dtype)[0].eval()
    with torch.no_grad():
        return trained, distill_loss(merged, batch, teacher=prep.teacher).item()


@pytest.mark.parametrize("qat", [True, False])
def test_the_merge_keeps_the_trained_loss_exactly_with_qat_and_not_without(make_ctx, nf4_dir, qat):
    ctx, cfg, prep, _ = _train_qat(make_ctx, nf4_dir, "float32", steps=10, qat=qat, init="default",
                                   requantize_from="dequantized")
    trained, merged = _merged_loss(ctx, cfg, prep, "merged")
    if qat:
        assert merged == trained  # the same model, bit for bit
    else:  # the adapter's corrections are below half a 4-bit step: requantizing rounds them away
        assert merged != trained and abs(merged - trained) > 0.05 * trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The recovery recipe's shape on the tiny model: QAT, and QAT on a re-fitted base, merges measured."""
    from llmcompress.pipeline import run_recipe

    out = {}
    for name, qat in (("qat", True), ("refit", {"refit": "gptq", "refit_samples": 8})):
        lora = _lora(qat=qat, steps=6, init="default")  # merge: [requantize], the one mode qat allows
        stages = [{"type": "quantize", "method": "bnb-nf4"}, EVAL, lora, EVAL]
        folder = tmp_path_factory.mktemp(f"qat-{name}")
        out[name] = (folder, run_recipe(_recipe(tiny_model_dir, stages), folder, show_progress=False))
    return out


def test_the_stage_records_what_qat_did(runs):
    data = runs["qat"][1]["stages"][2]["data"]
    assert data["qat"]["requantize_from"] == "original" and 0 < data["qat"]["codes_changed"] < 0.5
    assert data["qat"]["quantize_seconds_per_step"] > 0 and data["qat"]["layers"] == 14
    assert data["merge"] == "requantize"  # an NF4 model again: the size of the base (header bytes aside)
    assert data["merges"]["requantize"]["size_bytes"] == pytest.approx(data["base_size_bytes"], rel=0.01)


@pytest.mark.parametrize("name", ["qat", "refit"])
def test_the_saved_adapter_holds_the_adapter_alone(runs, name):
    """QAT once registered a requantized copy of each base weight on the LoRA layers themselves (`is_bnb_4bit` took
    a peft wrapper, whose `weight` property reaches its base's, for a 4-bit layer), and peft saved every one of them
    in the adapter: 210 packed weights, +50 MiB, on the default model."""
    from safetensors.torch import load_file

    folder, _ = runs[name]
    keys = load_file(folder / "03-lora" / "adapter" / "adapter_model.safetensors")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), [k for k in keys if "lora_" not in k][:3]


def test_the_refit_base_is_measured_alone_and_its_folders_are_kept(runs):
    folder, report = runs["refit"]
    refit = report["stages"][2]["data"]["qat"]["refit"]
    assert refit["output_error_gptq"] < refit["output_error_rtn"] and refit["layers"] == 14
    assert (folder / "03-lora" / "refit" / "model" / "llmcompress.json").is_file()
    mm = report["comparison"]["merges"]
    assert mm["refit"]["kl_mean"] == refit["measured"]["kl_mean"]
    assert "| re-fitted base alone (no adapter) |" in (folder / "report.md").read_text()
    assert "re-fitted" in (folder / "03-lora" / "model" / "llmcompress.json").read_text()  # the merge passed on


def test_the_report_says_which_merge_was_passed_on_and_its_share_of_the_gap(runs):
    folder, report = runs["refit"]  # one merge mode: measured beside the re-fitted base alone
    md = (folder / "report.md").read_text()
    assert "after lora (merged: requantize)" in md and "passed on: merge `requantize`" in md
    assert "quantization-aware" in md
    assert "| requantize (passed on) |" in md and "KL gap closed" in md
    modes = report["comparison"]["merges"]["modes"]
    rec = report["comparison"]["recovery"]["figures"]["kl_mean"]
    # the merge table's share for the mode passed on is the recovery table's (same windows, same model)
    assert modes["requantize"]["kl_gap_closed"] == pytest.approx(rec["gap_closed"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Refused where it cannot work: in Python, and through the command line (exit 2, the place and the fix)


@pytest.mark.parametrize("stages,match", [
    ([_lora()], r"stages\[0\] \(lora\): `qat: true` .* there is none \(a dense or GGUF model\)\. Fix: add "
                r"`\{type: quantize, method: bnb-nf4\}`"),
    ([{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}, _lora()],
     r"stages\[1\] \(lora\): .* the quantize stage before uses `rtn`\. Fix: quantize with bnb-nf4 or bnb-fp4"),
    ([{"type": "quantize", "method": "bnb-int8"}, _lora()], r"uses `bnb-int8`"),
    ([{"type": "quantize", "method": "bnb-nf4"}, _lora(qat=False, merge="dequantized"), _lora()],
     r"stages\[2\] \(lora\): .* a `lora` stage changes it in between\. Fix: put the lora stage right after the "
     r"quantize stage"),
    ([{"type": "quantize", "method": "bnb-nf4"}, _lora(merge=["keep", "requantize"])],
     r"`merge` asks for `keep` too: that adds the adapter unquantized, .* Fix: `merge: requantize`"),
    ([{"type": "quantize", "method": "bnb-nf4"}, _lora(merge=["requantize", "dequantized"])],
     r"asks for `dequantized` too"),
    ([{"type": "quantize", "method": "bnb-nf4"}, _lora(dropout=0.1)], r"no dropout .* Fix: set `dropout: 0`"),
    ([{"type": "quantize", "method": "bnb-nf4"}, _lora(accelerate={"num_processes": 2})], r"trains in one process"),
])
def test_recipes_qat_cannot_serve_are_refused_when_they_load(tiny_model_dir, stages, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(tiny_model_dir, stages)


def test_qat_on_a_model_without_bnb_4bit_layers_is_refused_before_training(make_ctx, tiny_model_dir):
    from llmcompress.lora.init import init_default
    from llmcompress.lora.qat import enable_qat

    ctx = make_ctx(stages=[{"type": "quantize", "method": "bnb-nf4"}, _lora()])
    ctx.stage_index = 1
    model = load_model(tiny_model_dir, "cpu", "float32")[0]  # dense: as if the quantize stage had not run
    peft_model, _ = init_default(model, ctx.recipe.stages[1], ctx)
    with pytest.raises(RecipeError, match=r"stages\[1\] \(lora\): `qat: true` .* no bnb 4-bit layer\. Fix"):
        enable_qat(peft_model, ctx.recipe.stages[1], ctx)


def test_the_docstring_sample_and_the_recovery_recipe_load(tiny_model_dir):
    from llmcompress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "smollm2-nf4-recover.yaml")
    lora = next(s for s in recipe.stages if s.type == "lora")
    assert lora.qat and lora.qat.refit == "gptq" and lora.merges[0] == "requantize"
    assert lora.requantize_from == "original"  # the merge adds the adapter to the re-fitted weights


HEAD = "name: r\nmodel: tiny-random-llama\nthreads: 1\nstages:\n"
NF4 = "  - {type: quantize, method: bnb-nf4}\n"
QAT = "  - {type: lora, objective: distill, qat: true, merge: [requantize]"

BAD = [  # (id, recipe text, fragments the message must hold)
    ("qat-dense-model", HEAD + QAT + "}\n", ["stages[0] (lora)", "`qat: true`", "a dense or GGUF model", "Fix:"]),
    ("qat-gguf", HEAD + "  - {type: quantize, method: gguf, gguf_type: q4_k_m}\n" + QAT + "}\n",
     ["stages[1] (lora)", "a GGUF file", "torch cannot train an adapter on", "Fix: put the lora stage before"]),
    ("qat-gptq", HEAD + "  - {type: quantize, method: gptq}\n" + QAT + "}\n", ["stages[1] (lora)", "uses `gptq`"]),
    ("qat-keep-too", HEAD + NF4 + QAT.replace("[requantize]", "[requantize, keep]") + "}\n",
     ["stages[1] (lora)", "asks for `keep` too", "a function it was not trained for", "Fix: `merge: requantize`"]),
    ("qat-not-bool", HEAD + NF4 + QAT + ", qat: maybe}\n", ["qat"]),
    ("qat-dropout", HEAD + NF4 + QAT + ", dropout: 0.05}\n", ["stages[1] (lora)", "`dropout: 0`"]),
    ("qat-typo", HEAD + NF4 + "  - {type: lora, objective: distill, qta: true}\n", ["unknown key `qta`"]),
    ("qat-clip-above-1", HEAD + NF4 + QAT.replace("qat: true", "qat: {refit: gptq, refit_clip: 1.5}") + "}\n",
     ["stages[1]", "refit_clip", "1.5"]),
    ("qat-refit-more-than-data",
     HEAD + NF4 + QAT.replace("qat: true", "qat: {refit: gptq, refit_samples: 64}") + ", data: {samples: 16}}\n",
     ["stages[1]", "`qat.refit_samples` is 64", "which has 16", "Fix: set `qat.refit_samples` to at most 16"]),
    ("qat-set-on-dense", None, ["stages[0] (lora)", "`qat: true`", "Fix:"]),
]


@pytest.mark.parametrize("case_id,text,expect", BAD, ids=[c[0] for c in BAD])
def test_bad_qat_recipes_exit_2_with_a_message_that_names_the_place(tmp_path, monkeypatch, case_id, text, expect):
    from typer.testing import CliRunner

    from llmcompress.cli import app

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    if text is None:  # the override names the place: a lora stage on the dense model, made QAT by --set
        recipe.write_text(HEAD + "  - {type: lora, objective: distill, merge: [requantize]}\n")
        args = ["validate", str(recipe), "--set", "stages.0.qat=true"]
    else:
        recipe.write_text(text)
        args = ["validate", str(recipe)]
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code == 2, output
    assert not re.search(r"Traceback|validation errors? for|errors\.pydantic\.dev", output), output
    flat = " ".join(output.split())
    for fragment in [str(recipe), *expect]:
        assert fragment in flat, f"{case_id}: {fragment!r} not in:\n{output}"
    assert not (tmp_path / "runs").exists()
