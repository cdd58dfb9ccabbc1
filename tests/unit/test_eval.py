"""The evaluate stage on the tiny random llama: lm-eval local tasks, perplexity, KL, errors and the baseline cache."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from llmcompress.errors import RecipeError  # noqa: E402
from llmcompress.eval import harness, tasks  # noqa: E402
from llmcompress.eval.perplexity import PerplexityConfig, load_corpus, make_windows, perplexity  # noqa: E402
from llmcompress.eval.stage import EvaluateStage  # noqa: E402

SMALL_PPL = {"ctx_len": 128, "stride": 64, "max_tokens": 384}


# one torch thread for every test here (tests/conftest.py): figures that do not depend on the thread count
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from llmcompress.models.loading import load_model

    return load_model(tiny_model_dir, "cpu", "bfloat16")


@pytest.fixture(scope="module")
def perturbed_dir(tiny, tmp_path_factory) -> Path:
    """A copy of the tiny model with noise on every weight: a stand-in for a compressed model."""
    import copy

    import torch

    model, tok = tiny
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
    path = tmp_path_factory.mktemp("perturbed")
    noisy.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "llmcompress.json").write_text(json.dumps({"format": "hf", "method": "noise"}))
    return path


# --- config -----------------------------------------------------------------------------------------------------------


def test_docstring_yaml_sample_validates(tiny_model_dir):
    from llmcompress.recipe import load_recipe

    sample = re.search(r"```yaml\n(.*?)```", EvaluateStage.__doc__, re.S).group(1)
    recipe = load_recipe({"name": "doc", "model": str(tiny_model_dir), "stages": yaml.safe_load(sample)})
    stage = recipe.stages[0]
    assert isinstance(stage, EvaluateStage)
    assert stage == EvaluateStage()  # the sample shows the defaults


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"perplexity": {"ctx_len": 128, "stride": 256}}, "must be <= `ctx_len`"),
        ({"perplexity": {"corpus": "builtin:pydocs"}}, "Did you mean `builtin:pydoc`"),
        ({"perplexity": {"corpus": "notes.md"}}, ".txt file or a .jsonl"),
        ({"tasks": [], "perplexity": None}, "nothing to evaluate"),
        ({"tasks": ["pydoc_ppl", "pydoc_ppl"]}, "listed twice"),
        ({"limt": 5}, "Did you mean `limit`"),
    ],
)
def test_bad_config_names_the_fix(tiny_model_dir, stage, message):
    from llmcompress.recipe import load_recipe

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe({"name": "x", "model": str(tiny_model_dir), "stages": [{"type": "evaluate", **stage}]})


# --- perplexity and KL ------------------------------------------------------------------------------------------------


def test_windows_score_every_token_once(tiny):
    _, tok = tiny
    cfg = PerplexityConfig(ctx_len=100, stride=30, max_tokens=1000)
    w = make_windows(tok, load_corpus("builtin:pydoc"), cfg)
    assert len(w.ids) == 1000 and w.scored == 999
    ends = 1
    for begin, end, first in w.spans:
        assert first == ends and end - begin <= 100
        assert first - begin >= 100 - 30 or begin == 0  # context of at least ctx_len - stride
        ends = end
    assert ends == 1000


def test_random_model_perplexity_is_near_vocab_size(tiny):
    model, tok = tiny
    w = make_windows(tok, load_corpus("builtin:pydoc"), PerplexityConfig(**SMALL_PPL))
    res = perplexity(model, w)
    assert res["tokens"] == SMALL_PPL["max_tokens"] - 1 and res["corpus"] == "builtin:pydoc"
    vocab = model.config.vocab_size
    assert vocab / 2 < res["perplexity"] < vocab * 2, res


def test_kl_is_zero_against_itself_and_positive_against_a_perturbed_copy(tiny, perturbed_dir):
    from llmcompress.eval.kl import compare
    from llmcompress.models.loading import load_model

    model, tok = tiny
    w = make_windows(tok, load_corpus("builtin:pydoc"), PerplexityConfig(**SMALL_PPL))
    same = compare(model, model, w)
    assert same.kl["kl_max"] < 1e-6 and same.kl["top1_agreement"] == 1.0
    assert same.kl["tokens"] == w.scored

    noisy, _ = load_model(perturbed_dir, "cpu", "bfloat16")
    diff = compare(model, noisy, w)
    assert diff.kl["kl_mean"] > 1e-3 and diff.kl["kl_p95"] >= diff.kl["kl_mean"] * 0.5
    assert diff.kl["kl_max"] >= diff.kl["kl_p95"] and diff.kl["top1_agreement"] < 1.0
    # The same pass yields the compressed model's perplexity, equal to a direct measurement.
    assert math.isclose(diff.perplexity["perplexity"], perplexity(noisy, w)["perplexity"], rel_tol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kl_from_a_logits_store_is_the_side_by_side_kl_bit_for_bit(tiny_model_dir, perturbed_dir, tmp_path, dtype):
    """The evaluate stage keeps one model in memory: the original's logits go to disk and KL reads them back."""
    from llmcompress.eval import reference
    from llmcompress.eval.kl import compare
    from llmcompress.models.loading import load_model

    model, tok = load_model(tiny_model_dir, "cpu", dtype)
    noisy, _ = load_model(perturbed_dir, "cpu", dtype)
    w = make_windows(tok, load_corpus("builtin:pydoc"), PerplexityConfig(**SMALL_PPL))
    store = tmp_path / "store"
    assert reference.write(store, model, w) == perplexity(model, w)  # the same pass gives the original's perplexity
    index = reference.read_index(store, w)
    assert index["dtype"] == dtype and index["vocab"] == model.config.vocab_size
    assert (store / "logits.bin").stat().st_size == w.scored * index["vocab"] * (2 if dtype == "bfloat16" else 4)
    assert compare(store, noisy, w) == compare(model, noisy, w)

    other = make_windows(tok, load_corpus("builtin:pydoc"), PerplexityConfig(**{**SMALL_PPL, "stride": 32}))
    assert reference.read_index(store, other) is None  # other windows: never read
    with pytest.raises(ValueError, match="no complete logits store"):
        next(reference.logprobs(store, other))
    with open(store / "logits.bin", "ab") as f:
        f.write(b"\0")
    assert reference.read_index(store, w) is None  # a file that is not what the index says: never read


def test_evaluate_keeps_one_model_in_memory_and_reuses_the_original_logits(tiny_model_dir, perturbed_dir, tmp_path,
                                                                           monkeypatch):
    """KL against the original without both models loaded; a second run reads the original's cached logits."""
    from llmcompress import run_recipe
    from llmcompress.context import ModelHandle

    monkeypatch.setenv("LLMCOMPRESS_CACHE", str(tmp_path / "cache"))
    loaded_at_once = []
    load = ModelHandle.load

    import gc
    import weakref

    # Handles other tests left alive in this process are not this run's: count only the ones made from here on.
    before = weakref.WeakSet(o for o in gc.get_objects() if isinstance(o, ModelHandle))

    def count_handles(self):
        out = load(self)
        loaded_at_once.append(sum(1 for o in gc.get_objects()
                                  if isinstance(o, ModelHandle) and o._loaded is not None and o not in before))
        return out

    monkeypatch.setattr(ModelHandle, "load", count_handles)
    recipe = {"name": "kl-store", "model": str(tiny_model_dir), "dtype": "float32", "threads": 1, "stages": [
        {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32},
        {"type": "evaluate", "tasks": [], "perplexity": SMALL_PPL}]}
    first = run_recipe(recipe, tmp_path / "a", show_progress=False)
    assert loaded_at_once and max(loaded_at_once) == 1, loaded_at_once
    stores = list((tmp_path / "cache" / "baseline").glob("evaluate-logits-*"))
    assert len(stores) == 1 and (stores[0] / "index.json").is_file()
    kl = first["stages"][1]["data"]["compressed"]["kl"]
    assert kl["kl_mean"] > 0 and kl["tokens"] == SMALL_PPL["max_tokens"] - 1

    loaded_at_once.clear()
    second = run_recipe(recipe, tmp_path / "b", show_progress=False)  # original from the cache: it never loads
    assert second["stages"][1]["data"]["compressed"]["kl"] == kl
    assert second["stages"][1]["data"]["timing"]["original"]["cached"]

    import shutil

    shutil.rmtree(stores[0])  # the store is gone but the results are cached: the original runs alone to rewrite it
    third = run_recipe(recipe, tmp_path / "c", show_progress=False)
    assert third["stages"][1]["data"]["compressed"]["kl"] == kl and max(loaded_at_once) == 1
    assert (stores[0] / "index.json").is_file()


def test_corpus_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    assert load_corpus("a.txt", tmp_path) == "hello world"
    assert load_corpus(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    with pytest.raises(RecipeError, match=r"c\.jsonl:2: no string `text` field"):
        load_corpus("c.jsonl", tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(RecipeError, match=r"d\.jsonl:2: not valid JSON .* Fix: one JSON object per line"):
        load_corpus("d.jsonl", tmp_path)
    with pytest.raises(RecipeError, match="no such file"):
        load_corpus("missing.txt", tmp_path)


# --- lm-eval tasks ----------------------------------------------------------------------------------------------------


def test_local_tasks_run_from_another_cwd(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files are relative to llmcompress/evals/, not to the working directory
    model, tok = tiny
    res = harness.run_tasks(model, tok, ["pydoc_ppl", "pydoc_cloze"], limit=4, batch_size=4)
    ppl, cloze = res["pydoc_ppl"], res["pydoc_cloze"]
    assert ppl["word_perplexity"] > 1 and ppl["byte_perplexity"] > 1 and ppl["bits_per_byte"] > 0
    assert 0 <= cloze["acc"] <= 1 and 0 <= cloze["acc_norm"] <= 1 and "acc_stderr" in cloze
    assert all(isinstance(v, float) and "," not in k for m in res.values() for k, v in m.items())


def test_cloze_few_shot_examples_come_from_their_own_split(tiny):
    model, tok = tiny
    task = harness.task_manager(["pydoc_cloze"]).load(["pydoc_cloze"])["tasks"]["pydoc_cloze"]
    assert len(task.fewshot_docs()) == 16 and len(task.test_docs()) == 250
    res = harness.run_tasks(model, tok, ["pydoc_cloze"], limit=2, num_fewshot=2)
    assert res["pydoc_cloze"]["samples"] == 2


def test_evals_folder_from_env_with_includes_and_functions(tiny, tmp_path, monkeypatch):
    """A user's task folder: a template holding the data path, a `!function` helper, run from another CWD."""
    sub = tmp_path / "evals" / "sub"
    (sub / "data").mkdir(parents=True)
    (sub / "data" / "d.jsonl").write_text('{"text": "The assert statement."}\n{"text": "A class definition."}\n')
    (sub / "_template.yaml").write_text(
        "dataset_path: json\ndataset_kwargs: {data_files: {test: data/d.jsonl}}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: byte_perplexity}]\n"
    )
    (sub / "mine.yaml").write_text("include: _template.yaml\ntask: mine\nprocess_docs: !function utils.keep\n")
    (sub / "utils.py").write_text("def keep(ds):\n    return ds\n")
    monkeypatch.setenv(tasks.EVALS_ENV, str(tmp_path / "evals"))
    monkeypatch.chdir(tmp_path)
    assert list(tasks.local_tasks()) == ["mine"]
    rendered = yaml.safe_load((tasks.render_include_dir() / "mine.yaml").read_text())
    assert rendered["include"] == str(sub / "mine.yaml")
    assert rendered["dataset_kwargs"]["data_files"]["test"] == str(sub / "data" / "d.jsonl")
    model, tok = tiny
    res = harness.run_tasks(model, tok, ["mine"])
    assert res["mine"]["byte_perplexity"] > 1 and res["mine"]["samples"] == 2


def test_unknown_task_says_did_you_mean():
    with pytest.raises(RecipeError) as e:
        harness.check_tasks(["pydoc_clze"])
    assert "unknown task `pydoc_clze`" in str(e.value) and "Did you mean `pydoc_cloze`" in str(e.value)
    assert "pydoc_ppl" in str(e.value)  # the list of local tasks


def test_hub_task_while_offline_fails_at_once(tiny, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=r"`hellaswag` is not a local task .* hub, which is offline \(HF_"):
        harness.run_tasks(model, tok, ["hellaswag"])
    assert time.perf_counter() - t0 < 30  # no network wait (a connection timeout is minutes); slack for a busy box


def test_unreachable_hub_is_detected_quickly(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.perf_counter()
    reason = harness.hub_offline_reason()
    assert reason and "127.0.0.1:9 cannot be reached" in reason and time.perf_counter() - t0 < 30
    with pytest.raises(RecipeError, match="cannot be reached"):
        harness.check_tasks(["arc_easy"])


def test_online_names_are_checked_against_lm_evals_index(monkeypatch):
    class FakeManager:
        all_tasks = ["hellaswag", "arc_easy"]

    monkeypatch.setattr(harness, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(harness, "task_manager", lambda tasks: FakeManager())
    harness.check_tasks(["hellaswag", "pydoc_ppl"])
    with pytest.raises(RecipeError, match="unknown task `helaswag`. Did you mean `hellaswag`"):
        harness.check_tasks(["helaswag"])


def test_clean_results():
    raw = {"t": {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": "t", "em,strict": 1, "x,none": float("nan"),
                 "sample_len": 4}}
    assert harness.clean_results(raw) == {"t": {"acc": 0.5, "em,strict": 1.0, "samples": 4.0}}


# --- the stage --------------------------------------------------------------------------------------------------------


def _stage(**kw) -> dict:
    return {"type": "evaluate", "limit": 3, "batch_size": 4, "perplexity": SMALL_PPL, **kw}


def test_stage_layout_and_original_cache(make_ctx, perturbed_dir, monkeypatch):
    calls = []
    real = harness.evaluate_tasks
    monkeypatch.setattr(harness, "evaluate_tasks", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))

    ctx = make_ctx(stages=[_stage(limit=2)], compressed=perturbed_dir)
    stage = ctx.recipe.stages[0]
    first = stage.run(ctx)
    assert len(calls) == 2 and first.data["timing"]["original"]["cached"] is False
    data = first.data
    assert set(data) == {"settings", "original", "compressed", "timing"}
    s = data["settings"]
    assert s["tasks"] == ["pydoc_ppl", "pydoc_cloze"] and s["limit"] == 2 and s["num_fewshot"] == 0
    assert s["batch_size"] == 4 and s["perplexity"]["ctx_len"] == 128 and s["threads"] == 1 and s["device"] == "cpu"
    assert s["kl"] is True and "notes" not in s and s["corpus_fingerprint"] and s["tasks_fingerprint"]
    for role in ("original", "compressed"):
        assert 0 <= data[role]["pydoc_cloze"]["acc"] <= 1 and data[role]["pydoc_ppl"]["word_perplexity"] > 1
        assert data[role]["perplexity"]["tokens"] == SMALL_PPL["max_tokens"] - 1
    assert "kl" not in data["original"] and data["compressed"]["kl"]["kl_mean"] > 0
    assert data["original"]["perplexity"] != data["compressed"]["perplexity"]
    assert {"pydoc_cloze acc", "perplexity", "KL"} <= set(first.summary)
    json.dumps(first.model_dump())  # result.json must serialize

    calls.clear()
    second = stage.run(ctx)  # the original's figures come from the cache: lm-eval runs for the compressed model only
    assert calls == [ctx.current.load()[0]] and second.data["timing"]["original"]["cached"] is True
    assert second.data["original"] == data["original"]


def test_stage_without_compression_reports_the_same_numbers(make_ctx):
    ctx = make_ctx(stages=[_stage(tasks=["pydoc_cloze"])])
    res = ctx.recipe.stages[0].run(ctx)
    assert res.data["original"] == res.data["compressed"] and "kl" not in res.data["compressed"]
    assert any("repeats the original" in n for n in res.data["settings"]["notes"])
    assert "(original only) ±" in res.summary["pydoc_cloze acc"]


def test_stage_notes_that_kl_needs_perplexity(make_ctx, perturbed_dir):
    ctx = make_ctx(stages=[{"type": "evaluate", "tasks": ["pydoc_cloze"], "limit": 2, "perplexity": None}],
                   compressed=perturbed_dir)
    res = ctx.recipe.stages[0].run(ctx)
    assert "perplexity" not in res.data["compressed"] and "kl" not in res.data["compressed"]
    assert res.data["settings"]["kl"] is False
    assert any(n.startswith("KL skipped") for n in res.data["settings"]["notes"])
