"""The lora stage on the tiny model: objectives, inits, merge modes, adapter round trip, report, clear errors.

One pipeline run (bnb-nf4 -> evaluate -> lora distill with all three merge modes -> evaluate) is shared by the
module; the other tests build what they need directly. The tiny random llama's next-token distributions are close
to uniform, so its quantization gap is small in absolute terms (KL ~1e-4 nats): the tests compare shares of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from llmcompress.errors import RecipeError  # noqa: E402
from llmcompress.models.loading import load_model  # noqa: E402

TEXT = "The for statement is used to iterate over the elements of a sequence.\n"
EVAL = {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 512, "ctx_len": 128, "stride": 64}}
DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def _logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def _recipe(tiny_model_dir, stages, name="lora-test"):
    from llmcompress.recipe import load_recipe

    return load_recipe({"name": name, "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
                        "stages": stages})


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory, tiny_model_dir):
    """bnb-nf4 -> evaluate -> lora distill (merge keep, requantize, dequantized) -> evaluate, on the tiny model."""
    pytest.importorskip("bitsandbytes")
    from llmcompress.pipeline import run_recipe

    out = tmp_path_factory.mktemp("lora-run")
    lora = {"type": "lora", "objective": "distill", "data": {"samples": 32, "seq_len": 64}, "r": 8, "steps": 30,
            "lr": 0.003, "merge": ["keep", "requantize", "dequantized"]}
    stages = [{"type": "quantize", "method": "bnb-nf4"}, EVAL, lora, EVAL]
    report = run_recipe(_recipe(tiny_model_dir, stages), out, show_progress=False)
    return out, report


# ---------------------------------------------------------------------------------------------------------------------
# Objectives


def test_distill_lowers_its_loss_and_closes_part_of_the_kl_gap(nf4_run):
    _, report = nf4_run
    data = report["stages"][2]["data"]
    assert data["loss_last"] < 0.8 * data["loss_first"]
    # r (in + out) per layer: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64; x 2 layers
    assert data["trainable_params"] == 2 * 8 * (128 + 96 + 96 + 128 + 192 * 3)
    rec = report["comparison"]["recovery"]
    kl = rec["figures"]["kl_mean"]
    assert kl["after"] < kl["before"] and kl["gap_closed"] > 0.1
    assert rec["before_stage"] == "02-evaluate" and rec["after_stage"] == "04-evaluate"


def test_sft_on_chat_rows_lowers_its_loss_and_scores_only_replies(tiny_model_dir, tmp_path):
    from llmcompress.pipeline import run_recipe

    lora = {"type": "lora", "objective": "sft", "data": {"source": str(DATA / "pydoc-qa-train.jsonl"), "samples": 16,
            "seq_len": 96}, "r": 4, "steps": 12, "lr": 0.01, "batch_size": 2, "grad_accum": 2,
            "gradient_checkpointing": True, "schedule": "linear", "warmup_steps": 2}
    report = run_recipe(_recipe(tiny_model_dir, [lora]), tmp_path / "run", show_progress=False)
    data = report["stages"][0]["data"]
    assert data["loss_last"] < data["loss_first"]
    assert 0 < data["loss_tokens"] < data["train_tokens"]  # prompts and padding are not targets


def test_distill_on_text_the_original_writes(tiny_model_dir, tmp_path):
    from llmcompress.pipeline import run_recipe

    lora = {"type": "lora", "objective": "distill", "data": {"samples": 8, "seq_len": 32}, "r": 4, "steps": 6,
            "lr": 0.01, "generate": {"prompt_tokens": 8, "new_tokens": 16, "batch_size": 4}}
    report = run_recipe(_recipe(tiny_model_dir, [lora]), tmp_path / "run", show_progress=False)
    data = report["stages"][0]["data"]
    assert data["sequences"] == 8 and data["seq_len"] == 8 + 16  # prompt + exactly new_tokens sampled tokens
    assert "sampled from the original model" in data["data_notes"][0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cached_teacher_logits_give_the_live_teachers_loss(tiny_model_dir, tmp_path, dtype):
    from llmcompress.lora.data import TrainData
    from llmcompress.lora.objectives import distill_loss
    from llmcompress.lora.teacher import TeacherLogits

    teacher, tok = load_model(tiny_model_dir, "cpu", dtype)
    student, _ = load_model(tiny_model_dir, "cpu", dtype)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ids = tok([TEXT * 4] * 5, return_tensors="pt")["input_ids"][:, :40]
    data = TrainData(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    cached = TeacherLogits.write(tmp_path / "t.bin", teacher, data, batch_size=2)
    assert (tmp_path / "t.bin").stat().st_size == ids.numel() * teacher.config.vocab_size * (
        2 if dtype == "bfloat16" else 4)
    batch = next(data.batches(3, seed=0))
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], use_cache=False).logits
        assert torch.allclose(cached.rows(batch["index"]).float(), live.float(), atol=1e-2 if dtype == "bfloat16"
                              else 1e-5)
        a = distill_loss(student, batch, teacher=cached, temperature=2.0)
        b = distill_loss(student, batch, teacher=teacher, temperature=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-2 if dtype == "bfloat16" else 1e-5)
    cached.remove()
    assert not (tmp_path / "t.bin").exists()


def test_distill_trains_with_the_teacher_on_disk_not_in_memory(tiny_model_dir, tmp_path, monkeypatch):
    from llmcompress.lora import train
    from llmcompress.lora.teacher import TeacherLogits
    from llmcompress.pipeline import run_recipe

    seen, loop = {}, train.train_loop_

    def watch(model, data, loss_fn, cfg, ctx, teacher, seed, *rest):
        seen.update(teacher=teacher, original_loaded=ctx.original._loaded is not None,
                    files=sorted(p.name for p in ctx.stage_dir.glob("teacher-logits*")))
        return loop(model, data, loss_fn, cfg, ctx, teacher, seed, *rest)

    monkeypatch.setattr(train, "train_loop_", watch)
    lora = {"type": "lora", "objective": "distill", "data": {"samples": 8, "seq_len": 32}, "r": 4, "steps": 4,
            "lr": 0.01}
    report = run_recipe(_recipe(tiny_model_dir, [{"type": "quantize", "method": "hqq", "bits": 4,
                                                  "group_size": 32}, lora]), tmp_path / "run", show_progress=False)
    assert isinstance(seen["teacher"], TeacherLogits) and not seen["original_loaded"]
    assert seen["files"] == ["teacher-logits-0.bin"]
    assert not list((tmp_path / "run").rglob("teacher-logits*"))  # removed when training ended
    data = report["stages"][1]["data"]
    assert data["steps"] == 4 and all(x > 0 for x in data["loss_curve"])  # KL to the teacher: never 0 after hqq


def test_chat_tokens_mark_the_reply_and_its_end_marker(tiny_model_dir):
    from transformers import AutoTokenizer

    from llmcompress.lora.data import chat_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = chat_tokens({"prompt": "What is a list?", "response": "A mutable sequence."}, tok)
    reply = tok.decode([i for i, m in zip(ids, mask) if m])
    assert reply.strip() == "A mutable sequence.<|im_end|>"
    assert "What is a list?" in tok.decode([i for i, m in zip(ids, mask) if not m])


# ---------------------------------------------------------------------------------------------------------------------
# Merge modes and the adapter round trip


def test_merge_modes_match_the_unmerged_model(nf4_run, tiny_model_dir):
    out, report = nf4_run
    merges = report["stages"][2]["data"]["merges"]
    keep, tok = load_model(out / "03-lora" / merges["keep"]["path"], "cpu", "float32")
    assert type(keep).__name__ == "PeftModelForCausalLM"
    ref = _logits(keep, tok)
    # dequantized = deq(Q) + s·BA exactly, then stored in bf16 (the original's dtype): bf16 keeps 8 significant
    # bits, a relative rounding of at most 2^-9 per weight; through two layers and the head the logits move by a
    # few such steps of their own scale, so 2^-6 of the largest logit is a bound with margin, and far below the
    # quantization's own effect on the logits (checked below).
    deq = _logits(load_model(out / "03-lora" / merges["dequantized"]["path"], "cpu", "float32")[0], tok)
    scale = ref.abs().max()
    assert (deq - ref).abs().max() <= scale * 2**-6
    # requantize rounds W + s·BA to NF4 again, so it cannot match; bound: it stays as close to the unmerged model as
    # the plain NF4 model is to the original (the second rounding costs about one quantization error, not more).
    req = _logits(load_model(out / "03-lora" / merges["requantize"]["path"], "cpu", "float32")[0], tok)
    orig = _logits(load_model(tiny_model_dir, "cpu", "float32")[0], tok)
    nf4 = _logits(load_model(out / "01-quantize" / "model", "cpu", "float32")[0], tok)
    assert (req - ref).abs().max() <= 2 * (nf4 - orig).abs().max()
    assert (deq - ref).abs().max() < (nf4 - orig).abs().max()
    # sizes: requantize is the NF4 size again; keep = NF4 + adapter; dequantized = a dense bf16 model
    assert merges["requantize"]["size_bytes"] < merges["keep"]["size_bytes"]
    assert merges["keep"]["size_bytes"] == merges["keep"]["base_bytes"] + merges["keep"]["adapter_bytes"]


@pytest.mark.parametrize("dequantized", [True, False])
def test_merge_written_a_tensor_at_a_time_is_the_merge_built_in_memory(nf4_run, tiny_model_dir, tmp_path,
                                                                      dequantized):
    """write_merged streams the source's files; merged_dense (its fallback, and the vision path) builds the dense
    model: the same bits either way, and a folder transformers loads as that model."""
    from safetensors.torch import load_file

    from llmcompress.lora.merge import MergeInputs, merged_dense, write_merged
    from llmcompress.models.loading import read_meta, storage_dtype_of

    out, _ = nf4_run
    inputs = MergeInputs(base=out / "01-quantize" / "model", adapter=out / "03-lora" / "adapter",
                         source=tiny_model_dir, quantize=None, meta={}, storage_dtype=storage_dtype_of(tiny_model_dir))
    folder = tmp_path / "streamed"
    folder.mkdir()
    write_merged(inputs, dequantized, folder, {"merge": "test"})
    dense, _, replaced = merged_dense(inputs, dequantized)
    streamed = load_file(str(folder / "model.safetensors"))
    expected = dense.state_dict()
    assert set(streamed) <= set(expected) and len(streamed) >= len(expected) - 1  # a tied head is stored once
    changed = 0
    for key, t in streamed.items():
        assert t.dtype == expected[key].dtype and torch.equal(t, expected[key]), key
        changed += not torch.equal(t, load_file(str(tiny_model_dir / "model.safetensors"))[key].to(t.dtype))
    assert changed >= 8  # the adapted (and, dequantized, the 4-bit) layers differ from the source
    assert read_meta(folder)["dequantized_modules"] == replaced and (replaced > 0) == dequantized
    reloaded, tok = load_model(folder, "cpu", "float32")
    assert torch.equal(_logits(reloaded, tok), _logits(dense.float(), tok))


def test_keep_folder_reloads_with_plain_peft_in_a_fresh_process(nf4_run, tmp_path):
    out, _ = nf4_run
    folder = out / "03-lora" / "model"
    keep, tok = load_model(folder, "cpu", "float32")
    ref = _logits(keep, tok)
    code = f"""
import torch, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(folder / "base")!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(folder)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(folder)!r})
with torch.no_grad():
    torch.save(model(**tok({TEXT!r}, return_tensors="pt")).logits.float(), {str(tmp_path / "l.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert torch.allclose(torch.load(tmp_path / "l.pt"), ref, atol=1e-5)
    meta = json.loads((folder / "llmcompress.json").read_text())
    assert meta["format"] == "peft" and meta["merge"] == "keep" and meta["lora"]["objective"] == "distill"


def test_report_shows_gap_closed_and_the_merge_table(nf4_run):
    out, report = nf4_run
    md = (out / "report.md").read_text()
    assert "## LoRA recovery" in md and "gap closed" in md
    assert "## LoRA merge modes" in md
    for mode in ("keep (passed on)", "requantize", "dequantized"):
        assert f"| {mode} |" in md
    modes = report["comparison"]["merges"]["modes"]
    assert all(m["kl_mean"] >= 0 and m["perplexity"] > 0 for m in modes.values())


# ---------------------------------------------------------------------------------------------------------------------
# Inits


def test_loftq_starts_closer_to_the_original_on_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from llmcompress.pipeline import run_recipe

    lora = {"type": "lora", "objective": "distill", "init": "loftq", "data": {"samples": 4, "seq_len": 32},
            "r": 8, "steps": 1, "lr": 1e-9}  # ~no training: what we see is the init
    stages = [{"type": "quantize", "method": "bnb-nf4"}, EVAL, lora, EVAL]
    report = run_recipe(_recipe(tiny_model_dir, stages), tmp_path / "run", show_progress=False)
    data = report["stages"][2]["data"]
    assert data["loftq_rel_error_after"] < data["loftq_rel_error_before"]
    assert report["comparison"]["recovery"]["figures"]["kl_mean"]["gap_closed"] > 0.05


def test_pissa_adapter_is_converted_to_a_plain_lora_on_the_unchanged_base(make_ctx, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from llmcompress.lora.init import init_pissa, lora_layers, save_adapter

    ctx = make_ctx(stages=[{"type": "lora", "objective": "sft", "init": "pissa", "r": 4}], dtype="float32")
    cfg = ctx.recipe.stages[0]
    model, tok = load_model(tiny_model_dir, "cpu", "float32")
    peft_model, info = init_pissa(model, cfg, ctx)
    torch.manual_seed(0)
    for _, layer in lora_layers(peft_model):  # stand-in for training: move A and B
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.data += 0.05 * torch.randn_like(p)
    ref = _logits(peft_model, tok)
    save_adapter(peft_model, tmp_path / "adapter", info)
    fresh = PeftModel.from_pretrained(load_model(tiny_model_dir, "cpu", "float32")[0], str(tmp_path / "adapter"))
    # the converted adapter (rank 2r) on the original weights = residual base + trained PiSSA adapter, in fp32
    assert torch.allclose(_logits(fresh, tok), ref, atol=1e-4)


def test_default_init_starts_as_the_base(make_ctx, tiny_model_dir):
    from llmcompress.lora.init import init_default

    ctx = make_ctx(stages=[{"type": "lora", "objective": "sft"}], dtype="float32")
    model, tok = load_model(tiny_model_dir, "cpu", "float32")
    ref = _logits(model, tok)
    peft_model, _ = init_default(model, ctx.recipe.stages[0], ctx)
    assert torch.equal(_logits(peft_model, tok), ref)


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize("stages, fix", [
    ([{"type": "lora", "objective": "distill", "merge": "requantize"}], "add a quantize stage before"),
    ([{"type": "lora", "objective": "distill", "init": "loftq"}], "no quantize stage comes before"),
    ([{"type": "quantize", "method": "bnb-nf4"}, {"type": "lora", "objective": "distill", "init": "pissa"}],
     "use `init: loftq`"),
    ([{"type": "lora", "objective": "sft", "generate": {}}], "set `objective: distill`"),
    ([{"type": "lora", "objective": "sft", "steps": 3, "epochs": 1}], "not both"),
    ([{"type": "lora", "objective": "distil"}], "Did you mean `distill`?"),
    ([{"type": "lora", "objective": "sft", "r": 0}], "must be > 0"),
    ([{"type": "lora", "objective": "sft", "merge": ["keep", "keep"]}], "listed twice"),
    ([{"type": "lora", "objective": "sft", "target_modules": "q_proj"}], "list module names instead"),
    ([{"type": "lora", "objective": "sft"}, {"type": "lora", "objective": "sft"}], "merge the first"),
])
def test_bad_combinations_are_rejected_when_the_recipe_loads(tiny_model_dir, stages, fix):
    with pytest.raises(RecipeError, match="stages\\[") as e:
        _recipe(tiny_model_dir, stages)
    assert fix in str(e.value)


def test_target_modules_that_match_nothing_list_what_exists(tiny_model_dir):
    from llmcompress.lora.init import target_names

    model, _ = load_model(tiny_model_dir, "cpu", "float32")
    with pytest.raises(RecipeError, match="match no linear layer") as e:
        target_names(model, ["qkv_proj"])
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)
    assert target_names(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert "lm_head" not in target_names(model, "all-linear")


def test_a_base_peft_cannot_wrap_is_a_clear_error(make_ctx):
    ctx = make_ctx(stages=[{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}], dtype="float32")
    ctx.recipe.stages[0].run(ctx)
    from llmcompress.lora.init import wrap
    from llmcompress.lora.stage import LoraStage

    model, _ = load_model(ctx.current.path, "cpu", "float32")
    with pytest.raises(RecipeError, match="peft cannot put LoRA on these layers \\(compressed-tensors packed"):
        wrap(model, LoraStage(objective="sft"), init_lora_weights=True)


def test_docstring_sample_loads(tiny_model_dir):
    import yaml

    from llmcompress.lora.stage import LoraStage

    sample = LoraStage.__doc__.split("```yaml")[1].split("```")[0]
    stage = yaml.safe_load(sample)[0]
    recipe = _recipe(tiny_model_dir, [{"type": "quantize", "method": "bnb-nf4"}, stage])
    assert recipe.stages[1].merges == ["keep"] and recipe.stages[1].lora_alpha == 16


# ---------------------------------------------------------------------------------------------------------------------
# The shipped recipes, shrunk onto the tiny model


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name,extra", [("smollm2-hqq-sft", "hqq"), ("smollm2-gptq-sft", "gptqmodel")])
def test_sft_recipe_runs_on_the_tiny_model(tmp_path, name, extra):
    pytest.importorskip(extra)
    from llmcompress.pipeline import run_recipe
    from llmcompress.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml", [
        "model=tiny-random-llama", "dtype=float32", "stages.2.epochs=1", "stages.2.r=4", "stages.2.data.samples=16"])
    report = run_recipe(recipe, tmp_path / "run", show_progress=False)
    data = report["stages"][2]["data"]
    assert data["objective"] == "sft" and data["loss_tokens"] < data["train_tokens"]
    rec = report["comparison"]["recovery"]
    assert rec["figures"]["perplexity"]["gap_closed"] is None  # sft is a task, not a repair: no gap figure
    assert "## LoRA fine-tune" in (tmp_path / "run" / "report.md").read_text()


def test_nf4_recover_recipe_runs_on_the_tiny_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from llmcompress.pipeline import run_recipe
    from llmcompress.recipe import load_recipe

    small = ["model=tiny-random-llama", "dtype=float32", "stages.3.steps=4", "stages.3.data.samples=8",
             "stages.3.qat.refit_samples=8",
             "stages.3.data.seq_len=32", "stages.3.r=4"]
    for i in (1, 4):
        small += [f"stages.{i}.tasks=[]", f"stages.{i}.perplexity.max_tokens=256"]
    for i in (2, 5):
        small += [f"stages.{i}.memory=false", f"stages.{i}.repeats=1", f"stages.{i}.new_tokens=4"]
    report = run_recipe(load_recipe(ROOT / "recipes" / "smollm2-nf4-recover.yaml", small), tmp_path / "run",
                        show_progress=False)
    rec = report["comparison"]["recovery"]
    assert set(rec["figures"]) == {"kl_mean", "top1_agreement", "perplexity"}
    # the merged model passed on (requantize) is an NF4 model again: the size of the base, not base + adapter
    assert rec["bench"] and rec["size"]["after_bytes"] == pytest.approx(rec["size"]["before_bytes"], rel=0.01)
    assert rec["train"]["merge"] == "requantize" and rec["train"]["qat"]
    # qat allows the requantize merge alone; it is measured beside the re-fitted base
    assert set(report["comparison"]["merges"]["modes"]) == {"requantize"} and report["comparison"]["merges"]["refit"]

@pytest.mark.parametrize("quantize, extra", [
    ({"method": "bnb-int8"}, "bitsandbytes"),
    ({"method": "hqq", "group_size": 32}, "hqq"),
    ({"method": "torchao-int8wo"}, "torchao"),
    ({"method": "gptq", "group_size": 32, "calibration": {"samples": 8, "seq_len": 64, "skip_tokens": 0}}, "gptqmodel"),
])
def test_lora_trains_on_each_quantized_base_peft_supports(tiny_model_dir, tmp_path, quantize, extra):
    pytest.importorskip(extra)
    from llmcompress.pipeline import run_recipe

    lora = {"type": "lora", "objective": "distill", "data": {"samples": 8, "seq_len": 32}, "r": 4, "steps": 3,
            "lr": 0.01, "merge": ["keep", "requantize"]}
    report = run_recipe(_recipe(tiny_model_dir, [{"type": "quantize", **quantize}, lora]), tmp_path / "run",
                        show_progress=False)
    data = report["stages"][1]["data"]
    assert data["steps"] == 3 and data["trainable_params"] > 0
    merges = data["merges"]
    assert merges["requantize"]["quantize"]["method"] == quantize["method"]
    # requantize is a model of the base's own kind again: no larger than the base plus its adapter
    assert merges["requantize"]["size_bytes"] <= merges["keep"]["size_bytes"]


def test_requantize_from_the_dequantized_base(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from llmcompress.pipeline import run_recipe

    lora = {"type": "lora", "objective": "distill", "data": {"samples": 8, "seq_len": 32}, "r": 4, "steps": 3,
            "lr": 0.01, "merge": "requantize", "requantize_from": "dequantized"}
    out = tmp_path / "run"
    report = run_recipe(_recipe(tiny_model_dir, [{"type": "quantize", "method": "bnb-nf4"}, lora]), out,
                        show_progress=False)
    assert report["stages"][1]["data"]["merges"]["requantize"]["requantize_from"] == "dequantized"
    meta = json.loads((out / "02-lora" / "model" / "llmcompress.json").read_text())
    assert meta["requantize_from"] == "dequantized" and meta["format"] == "hf"
    model, tok = load_model(out / "02-lora" / "model", "cpu", "float32")
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear4bit"


def test_a_missing_data_file_fails_before_training(tiny_model_dir, tmp_path):
    from llmcompress.pipeline import run_recipe

    lora = {"type": "lora", "objective": "sft", "data": {"source": str(tmp_path / "nope.jsonl")}}
    with pytest.raises(RecipeError, match="no such file"):
        run_recipe(_recipe(tiny_model_dir, [lora]), tmp_path / "run", show_progress=False)
