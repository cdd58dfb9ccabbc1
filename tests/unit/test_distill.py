"""The distill stage on the tiny model: the top-k loss against the KL computed directly, the teacher cache, a
prune -> distill run that lowers the KL to the original, budgets, resume, LoRA, the saved folder in plain transformers.

The tiny random llama's distributions are near uniform, so its KLs are small (1e-4 .. 1e-2 nats): the runs cache
float32 log-probs (``cache_dtype``), whose rounding stays below them, and compare shares of the gap.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llmcompress.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 512, "ctx_len": 64, "stride": 64}}
DATA = {"source": "builtin:pydoc", "samples": 32, "seq_len": 64, "skip_tokens": 4096}
DISTILL = {"type": "distill", "data": DATA, "budget": {"steps": 30}, "lr": 3e-4, "batch_size": 4, "top_k": 32,
           "cache_dtype": "float32"}


def _recipe(tiny_model_dir, stages, name="distill-test"):
    from llmcompress.recipe import load_recipe

    return load_recipe({"name": name, "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
                        "stages": stages})


def _run(tiny_model_dir, stages, out):
    from llmcompress.pipeline import run_recipe

    return run_recipe(_recipe(tiny_model_dir, stages), out, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def _direct_bucket_kl(t_logits, s_logits, k, temperature):
    """KL between the (k+1)-bucket distributions, in float64 from the definitions."""
    p = torch.softmax(t_logits.double() / temperature, -1)
    q = torch.softmax(s_logits.double() / temperature, -1)
    idx = p.topk(k, dim=-1).indices
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    p_rest, q_rest = 1 - pk.sum(-1), 1 - qk.sum(-1)
    kl = (pk * (pk.log() - qk.log())).sum(-1)
    rest = torch.where(p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.clamp_min(1e-300).log()),
                       torch.zeros_like(p_rest))
    return kl + rest


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (8, 1.0), (8, 2.0), (50, 0.5)])
def test_topk_loss_is_the_exact_bucket_kl(k, temperature):
    from llmcompress.distill.loss import topk_kl
    from llmcompress.distill.topk import topk_targets

    g = torch.Generator().manual_seed(k)
    t = torch.randn(2, 5, 200, generator=g) * 3
    s = t + torch.randn(2, 5, 200, generator=g)
    target = topk_targets(t, k, temperature, dtype="float32")
    got = topk_kl(target["values"], target["indices"], target["rest"], s, temperature)
    assert torch.allclose(got.double(), _direct_bucket_kl(t, s, k, temperature), rtol=1e-4, atol=1e-6)
    assert (got > 0).all()


def test_topk_over_the_whole_vocabulary_is_the_full_kl():
    from llmcompress.distill.loss import full_kl, topk_kl
    from llmcompress.distill.topk import topk_targets

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 4, 64, generator=g) * 2, torch.randn(3, 4, 64, generator=g) * 2
    target = topk_targets(t, 64, 1.0, dtype="float32")
    assert torch.isinf(target["rest"]).all()  # the bucket is empty
    got = topk_kl(target["values"], target["indices"], target["rest"], s)
    want = full_kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_cache_gives_back_the_live_teachers_topk(tiny_model_dir, tmp_path):
    from llmcompress.distill.topk import TopKLogits, topk_targets
    from llmcompress.models.loading import load_model

    teacher, tok = load_model(tiny_model_dir, "cpu", "float32")
    ids = tok(["The for statement is used to iterate over a sequence. " * 6] * 5, return_tensors="pt")["input_ids"]
    ids = ids[:, :40]
    cache = TopKLogits.write(tmp_path / "c", teacher, ids, torch.ones_like(ids), top_k=8, temperature=2.0,
                             hidden=True, batch_size=2, key="k1")
    n, length = ids.shape
    assert cache.nbytes == n * length * (8 * 2 + 8 * 4 + 4 + teacher.config.hidden_size * 4)  # fp16 values
    index = torch.tensor([4, 1])
    got = cache.targets(index)
    with torch.no_grad():
        out = teacher(input_ids=ids[index], output_hidden_states=True)
    want = topk_targets(out.logits, 8, 2.0)
    assert torch.equal(got["indices"], want["indices"]) and torch.equal(got["values"], want["values"])
    assert torch.allclose(got["rest"], want["rest"]) and torch.allclose(got["hidden"], out.hidden_states[-1])
    assert TopKLogits.open(tmp_path / "c", "k1") is not None
    assert TopKLogits.open(tmp_path / "c", "other") is None  # another configuration's cache is not used
    (tmp_path / "c" / "values.bin").write_bytes(b"cut")
    assert TopKLogits.open(tmp_path / "c", "k1") is None  # nor a damaged one
    cache.remove()
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------------------
# prune -> evaluate -> distill -> evaluate


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("distill-run")
    stages = [{"type": "prune", "method": "magnitude", "sparsity": 0.8}, EVAL,
              {**DISTILL, "held_out": {"tokens": 512, "every": 10}}, EVAL]
    return out, _run(tiny_model_dir, stages, out)


def test_distill_after_pruning_lowers_the_kl_to_the_original(pruned_run):
    _, report = pruned_run
    before = report["stages"][1]["data"]["compressed"]["kl"]["kl_mean"]
    after = report["stages"][3]["data"]["compressed"]["kl"]["kl_mean"]
    assert after < 0.8 * before  # the evaluate stage's full KL on other text (pydoc's first 512 tokens)
    data = report["stages"][2]["data"]
    assert data["loss_last"] < 0.5 * data["loss_first"]
    curve = data["held_out_curve"]
    assert [p["step"] for p in curve] == [0, 10, 20, 30]
    assert curve[-1]["kl"] < 0.7 * curve[0]["kl"]
    assert data["steps"] == 30 and data["tokens_trained"] == 30 * 4 * 64
    assert data["epochs"] == pytest.approx(30 * 4 / 32)
    assert data["data_notes"]  # 3.75 passes over the data: said
    assert data["tokens_per_second"] > 0 and data["teacher_cache_bytes"] > 0
    assert data["trainable_params"] == data["total_params"]
    assert (pruned_run[0] / "plots" / "distill.png").is_file()
    assert not (pruned_run[0] / "checkpoints").exists() or not any((pruned_run[0] / "checkpoints").rglob("*.bin"))


def test_the_saved_folder_gives_the_runs_logits_in_a_fresh_transformers_process(pruned_run, tmp_path):
    from llmcompress.models.loading import load_model

    out, _ = pruned_run
    folder = out / "03-distill" / "model"
    model, tok = load_model(folder, "cpu", "float32")
    ids = tok("def f(x):\n    return x + 1\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": want}, tmp_path / "want.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32)\n"
        f"w = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "with torch.no_grad(): got = m(input_ids=w['ids']).logits\n"
        "print('MAXDIFF', (got - w['logits']).abs().max().item())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    diff = float(res.stdout.split("MAXDIFF")[1])
    assert diff < 1e-5
    conf = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in conf


# ---------------------------------------------------------------------------------------------------------------------
# Budgets, resume, memory


def test_a_minutes_budget_stops_on_time(tiny_model_dir, tmp_path):
    stage = {**DISTILL, "budget": {"minutes": 0.05}}  # 3 seconds
    report = _run(tiny_model_dir, [stage], tmp_path / "run")
    data = report["stages"][0]["data"]
    per_step = data["train_seconds"] / data["steps"]
    assert 3.0 <= data["train_seconds"] <= 3.0 + 2 * per_step + 0.5
    assert data["steps"] > 3
    assert data["lr_curve"][0] == pytest.approx(3e-4) and data["lr_curve"][-1] < 0.1 * 3e-4  # cosine over the time


def test_a_list_of_sources_trains_on_the_windows_of_each(tiny_model_dir, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text(" ".join(f"word{i % 97} and more words {i}" for i in range(3000)), encoding="utf-8")
    sources = [{**DATA, "samples": 12}, {"source": str(text), "samples": 20, "seq_len": 64, "skip_tokens": 0}]
    report = _run(tiny_model_dir, [{**DISTILL, "data": sources, "budget": {"steps": 2}}], tmp_path / "run")
    data = report["stages"][0]["data"]
    assert data["data_sequences"] == 32 and data["data_tokens"] == 32 * 64
    assert [(d["source"], d["samples"]) for d in data["data_sources"]] == [("builtin:pydoc", 12), (str(text), 20)]


def test_a_tokens_budget_stops_at_the_first_step_past_it(tiny_model_dir, tmp_path):
    report = _run(tiny_model_dir, [{**DISTILL, "budget": {"tokens": 1000}}], tmp_path / "run")
    data = report["stages"][0]["data"]
    assert data["steps"] == 4 and data["tokens_trained"] == 4 * 256  # 256 tokens a step


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    from llmcompress.distill import train

    stage = {**DISTILL, "budget": {"steps": 8}, "checkpoint_every": 2}
    whole = _run(tiny_model_dir, [stage], tmp_path / "whole")
    step = train._step

    def killed(acc, wrapped, batches, teacher, cfg, ctx, loss_kw, at):
        if at == 5:
            raise KeyboardInterrupt  # killed during step 6: the checkpoint after step 4 remains
        return step(acc, wrapped, batches, teacher, cfg, ctx, loss_kw, at)

    monkeypatch.setattr(train, "_step", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, [stage], tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints" / "01-distill"
    assert (ckpts / "train" / "step-000004").is_dir() and (ckpts / "teacher-cache" / "train" / "cache.json").is_file()
    monkeypatch.setattr(train, "_step", step)
    resumed = _run(tiny_model_dir, [stage], tmp_path / "run")
    data = resumed["stages"][0]["data"]
    assert data["teacher_cache_reused"] is True and data["steps"] == 8
    assert data["loss_curve"][:4] == whole["stages"][0]["data"]["loss_curve"][:4]
    a, b = _weights(tmp_path / "whole" / "01-distill" / "model"), _weights(tmp_path / "run" / "01-distill" / "model")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n].float(), b[n].float(), atol=1e-6) for n in a)
    base = _weights(tiny_model_dir)
    assert any(not torch.equal(a[n].float(), base[n].float()) for n in a if n in base)  # it trained
    assert not (tmp_path / "run" / "checkpoints" / "01-distill").exists()  # removed when the stage finished


def test_the_teacher_is_not_in_memory_while_the_student_trains(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from llmcompress.distill import train
    from llmcompress.distill.topk import TopKLogits

    seen, loop = {}, train.train_loop_

    def models():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated module proxies warns
            warnings.simplefilter("ignore", FutureWarning)
            return [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]

    before = {id(o) for o in models()}  # other tests' models

    def watch(model, data, teacher, cfg, ctx, *rest):
        alive = [o for o in models() if id(o) not in before]
        inner = {id(m) for m in model.modules()}  # the student's own LlamaModel is a PreTrainedModel too
        seen.update(teacher=teacher, original_loaded=ctx.original._loaded is not None,
                    models=[m is model for m in alive if m is model or id(m) not in inner])
        return loop(model, data, teacher, cfg, ctx, *rest)

    monkeypatch.setattr(train, "train_loop_", watch)
    _run(tiny_model_dir, [{**DISTILL, "budget": {"steps": 2}}], tmp_path / "run")
    assert isinstance(seen["teacher"], TopKLogits) and not seen["original_loaded"]
    assert seen["models"] == [True]  # the student alone


# ---------------------------------------------------------------------------------------------------------------------
# LoRA, teachers, refusals


def test_lora_from_an_earlier_stage_teacher_merges_into_a_plain_folder(tiny_model_dir, tmp_path):
    stages = [{"type": "prune", "method": "magnitude", "sparsity": 0.3, "name": "mild"},
              {"type": "prune", "method": "magnitude", "sparsity": 0.8},
              {**DISTILL, "teacher": "mild", "train": "lora", "r": 4, "lr": 1e-2, "budget": {"steps": 10}}]
    report = _run(tiny_model_dir, stages, tmp_path / "run")
    data = report["stages"][2]["data"]
    assert data["teacher_path"].endswith("01-prune/model")
    assert data["trainable_params"] < 0.2 * data["total_params"]
    assert data["loss_last"] < data["loss_first"]
    folder = tmp_path / "run" / "03-distill" / "model"
    assert not (folder / "adapter_config.json").exists()
    merged, before = _weights(folder), _weights(tmp_path / "run" / "02-prune" / "model")
    assert not any("lora" in n for n in merged) and merged.keys() == before.keys()
    changed = [n for n in merged if not torch.equal(merged[n], before[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed)  # the adapted layers, merged


def test_a_quantized_student_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    stages = [{"type": "quantize", "method": "rtn", "bits": 8}, {**DISTILL, "budget": {"steps": 2}}]
    with pytest.raises(RecipeError, match="quantized model.*Fix: distill before the quantize stage"):
        _run(tiny_model_dir, stages, tmp_path / "run")


@pytest.mark.parametrize("stage,fix", [
    ({"teacher": "nope"}, "names no earlier stage"),
    ({"budget": {"steps": 0}}, "budget.steps"),
    ({"budget": {"steps": 3, "minutes": 2}}, "exactly one"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 100000}, "top_k"),
    ({"hidden_weight": -1}, "hidden_weight"),
    ({"held_out": {"every": 0}}, "every"),
    ({"r": 4}, "train: lora"),
])
def test_bad_settings_are_refused_when_the_recipe_loads(tiny_model_dir, stage, fix):
    with pytest.raises((RecipeError, ValueError), match=fix):
        _recipe(tiny_model_dir, [{"type": "distill", **stage}])


def test_docstring_sample_loads(tiny_model_dir):
    import yaml

    from llmcompress.distill.stage import DistillStage

    doc = DistillStage.__doc__
    sample = yaml.safe_load(doc[doc.index("```yaml") + 7: doc.index("```", doc.index("```yaml") + 7)])
    recipe = _recipe(tiny_model_dir, sample)
    assert recipe.stages[0].budget.minutes == 20 and recipe.stages[0].top_k == 64


def test_lora_distill_with_top_k_uses_the_shared_cache(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    lora = {"type": "lora", "objective": "distill", "data": {"samples": 8, "seq_len": 32}, "r": 4, "steps": 6,
            "lr": 0.01, "top_k": 16}
    report = _run(tiny_model_dir, [{"type": "quantize", "method": "hqq", "bits": 4, "group_size": 32}, lora],
                  tmp_path / "run")
    data = report["stages"][1]["data"]
    assert data["steps"] == 6 and all(x > 0 and math.isfinite(x) for x in data["loss_curve"])
    assert not list((tmp_path / "run").rglob("*.topk"))  # removed when training ended


def test_hidden_states_join_the_loss_and_unequal_widths_are_refused(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from llmcompress.distill.stage import DistillStage
    from llmcompress.distill.student import check_student

    stages = [{"type": "prune", "method": "magnitude", "sparsity": 0.8},
              {**DISTILL, "budget": {"steps": 2}, "hidden_weight": 1.0}]
    logits_only = _run(tiny_model_dir, stages[:1] + [{**DISTILL, "budget": {"steps": 2}}], tmp_path / "a")
    both = _run(tiny_model_dir, stages, tmp_path / "b")
    # the same first batch: the hidden-state MSE adds to the KL
    assert both["stages"][1]["data"]["loss_curve"][0] > logits_only["stages"][1]["data"]["loss_curve"][0]
    conf = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "config.json").write_text(json.dumps({**conf, "hidden_size": conf["hidden_size"] // 2}))
    cfg = DistillStage(hidden_weight=0.5)
    with pytest.raises(RecipeError, match="`hidden_weight` compares last hidden states.*Fix: `hidden_weight: 0`"):
        check_student(cfg, SimpleNamespace(path=narrow, meta={}), SimpleNamespace(path=tiny_model_dir, meta={}),
                      "stages[1] (distill)")
    check_student(DistillStage(), SimpleNamespace(path=narrow, meta={}), SimpleNamespace(path=tiny_model_dir,
                                                                                          meta={}), "here")


def test_bf16_autocast_trains_and_measures_held_out(tiny_model_dir, tmp_path):
    stage = {**DISTILL, "budget": {"steps": 3}, "precision": "bf16", "top_k": 16, "cache_dtype": "float16",
             "held_out": {"tokens": 256, "every": 2}}
    data = _run(tiny_model_dir, [stage], tmp_path / "run")["stages"][0]["data"]
    assert data["precision"] == "fp32 weights, bf16 autocast" and data["steps"] == 3
    assert [p["step"] for p in data["held_out_curve"]] == [0, 2, 3]
    assert all(math.isfinite(p["perplexity"]) for p in data["held_out_curve"])
