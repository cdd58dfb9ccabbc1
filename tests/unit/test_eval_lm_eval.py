"""lm-eval's side of the evaluate stage: the shipped tasks as ordinary lm-eval tasks, the fingerprint of local task
data, lm-eval's own results JSON per model and its chat-template options, on the tiny random llama."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("lm_eval")

from llmcompress import evals  # noqa: E402
from llmcompress.errors import LLMCompressError, RecipeError  # noqa: E402
from llmcompress.eval import harness, tasks  # noqa: E402
from llmcompress.eval.stage import EvaluateStage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CLOZE_ROWS = '{"topic": "t", "context": "One.", "choices": ["Two.", "Three.", "Four.", "Five."], "label": 0}\n'


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from llmcompress.models.loading import load_model

    return load_model(tiny_model_dir, "cpu", "bfloat16")


# --- the shipped tasks ------------------------------------------------------------------------------------------------


def test_shipped_tasks_are_ordinary_lm_eval_tasks_from_any_cwd(tmp_path, monkeypatch):
    """lm-eval's own TaskManager on the shipped folder (no overlay), from a folder that holds no data."""
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    assert tasks.evals_dir() == evals.path()
    assert (evals.path() / "chat" / "default.jsonl").is_file()
    for name in ("pydoc_cloze", "pydoc_ppl"):
        text = (evals.path() / f"{name}.yaml").read_text()
        assert "custom_dataset: !function loader.local_json" in text and "dataset_path" not in text
        overlay = yaml.safe_load((tasks.render_include_dir() / f"{name}.yaml").read_text())
        assert overlay == {"include": str(evals.path() / f"{name}.yaml")}  # nothing to rewrite
    loaded = TaskManager(include_path=str(evals.path()), include_defaults=False).load(["pydoc_cloze", "pydoc_ppl"])
    cloze, ppl = loaded["tasks"]["pydoc_cloze"], loaded["tasks"]["pydoc_ppl"]
    assert len(cloze.test_docs()) == 250 and len(cloze.fewshot_docs()) == 16 and len(ppl.test_docs()) == 150
    out = subprocess.run([sys.executable, "-m", "llmcompress.evals"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(evals.path()), out.stderr


def test_loader_reads_relative_to_its_own_copy(tiny, tmp_path, monkeypatch):
    """A copy of the folder (through $LLMCOMPRESS_EVALS) reads its own data, not the shipped one."""
    copy = tmp_path / "mine"
    shutil.copytree(evals.path(), copy, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    (copy / "data" / "pydoc_cloze.jsonl").write_text(CLOZE_ROWS * 3)
    monkeypatch.setenv(tasks.EVALS_ENV, str(copy))
    monkeypatch.chdir(tmp_path)
    model, tok = tiny
    assert harness.run_tasks(model, tok, ["pydoc_cloze"], limit=None)["pydoc_cloze"]["samples"] == 3


def test_fingerprint_covers_data_and_helpers_in_both_styles(tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(evals.path(), shipped, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    seen = [tasks.tasks_fingerprint(["pydoc_cloze"], shipped)]
    (shipped / "data" / "pydoc_cloze_shots.jsonl").write_text(CLOZE_ROWS)  # rebuilt data: stale
    seen.append(tasks.tasks_fingerprint(["pydoc_cloze"], shipped))
    (shipped / "loader.py").write_text((shipped / "loader.py").read_text() + "\n# changed\n")  # a changed loader
    seen.append(tasks.tasks_fingerprint(["pydoc_cloze"], shipped))
    assert seen[0] == tasks.tasks_fingerprint(["pydoc_cloze"], evals.path()) and len(set(seen)) == 3

    user = tmp_path / "user"  # overlay style: `dataset_path: json`, data relative to the YAML, a `!function` helper
    (user / "data").mkdir(parents=True)
    (user / "data" / "d.jsonl").write_text('{"text": "a"}\n')
    (user / "utils.py").write_text("def keep(ds):\n    return ds\n")
    (user / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {test: data/d.jsonl}}"
                                    "\nprocess_docs: !function utils.keep\ntest_split: test\n")
    seen = [tasks.tasks_fingerprint(["mine"], user)]
    (user / "data" / "d.jsonl").write_text('{"text": "b"}\n')
    seen.append(tasks.tasks_fingerprint(["mine"], user))
    (user / "utils.py").write_text("def keep(ds):\n    return ds.select([0])\n")
    seen.append(tasks.tasks_fingerprint(["mine"], user))
    assert len(set(seen)) == 3
    overlay = yaml.safe_load((tasks.render_include_dir(user) / "mine.yaml").read_text())
    assert overlay["dataset_kwargs"]["data_files"]["test"] == str(user / "data" / "d.jsonl")


def test_wikitext_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RecipeError, match=r"`wikitext` is not a local task .* offline \(HF_\w+=1 is set\)"
                       r"\. Fix: .*LLMCOMPRESS_EVALS.* run where the hub is reachable"):
        harness.check_tasks(["wikitext"], where="stages[1] (evaluate)")


# --- lm-eval's results file and prompt options ------------------------------------------------------------------------


def _stage(**kw) -> dict:
    return {"type": "evaluate", "tasks": ["pydoc_cloze"], "limit": 1, "batch_size": 2, "perplexity": None, **kw}


def test_stage_keeps_lm_evals_own_results_for_each_model(make_ctx, tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"  # a second model folder: both models are evaluated
    shutil.copytree(tiny_model_dir, copy)
    ctx = make_ctx(stages=[_stage(tasks=["pydoc_cloze", "pydoc_ppl"], limit=2)], compressed=copy)
    stage = ctx.recipe.stages[0]
    res = stage.run(ctx)
    files = {}
    for role in ("original", "compressed"):
        raw = files[role] = json.loads((ctx.stage_dir / f"lm-eval-{role}.json").read_text())
        assert set(raw["results"]) == set(raw["configs"]) == {"pydoc_cloze", "pydoc_ppl"}
        assert raw["versions"] == {"pydoc_cloze": 1.0, "pydoc_ppl": 1.0}
        assert raw["n-shot"] == {"pydoc_cloze": 0, "pydoc_ppl": 0} and raw["config"]["limit"] == 2
        assert raw["higher_is_better"]["pydoc_cloze"]["acc"] is True
        assert raw["higher_is_better"]["pydoc_ppl"]["word_perplexity"] is False
        assert raw["chat_template"] is None and raw["fewshot_as_multiturn"] is False and "samples" not in raw
        assert res.data[role]["pydoc_cloze"]["acc"] == raw["results"]["pydoc_cloze"]["acc,none"]
        assert "lm_eval" not in res.data[role]
    json.dumps(res.model_dump())
    s = res.data["settings"]
    assert (s["apply_chat_template"], s["fewshot_as_multiturn"], s["system_instruction"], s["log_samples"]) == (
        False, False, None, False)

    (ctx.stage_dir / "lm-eval-original.json").unlink()
    again = stage.run(ctx)  # the original's figures from the cache: its lm-eval file comes with them
    assert again.data["timing"]["original"]["cached"] is True
    assert json.loads((ctx.stage_dir / "lm-eval-original.json").read_text()) == files["original"]


def _prompt(ctx) -> str:
    raw = json.loads((ctx.stage_dir / "lm-eval-original.json").read_text())
    assert not (ctx.stage_dir / "lm-eval-compressed.json").exists()  # no compression: one model evaluated
    return raw, raw["samples"]["pydoc_cloze"][0]["arguments"][0][0]  # the first choice's (context, continuation)


def test_chat_template_options_reach_lm_eval(make_ctx, tiny):
    """Each option changes the prompt lm-eval renders (its per-sample log) and the cache key of the original."""
    _, tok = tiny
    system = "Answer tersely."
    ctx = make_ctx(stages=[_stage(num_fewshot=1, log_samples=True, apply_chat_template=True,
                                  system_instruction=system)])
    res = ctx.recipe.stages[0].run(ctx)
    raw, multiturn = _prompt(ctx)
    assert raw["chat_template"] == tok.chat_template and raw["chat_template_sha"]
    assert raw["fewshot_as_multiturn"] is True and raw["system_instruction"] == system  # null: on with a template
    assert multiturn.startswith(f"<|im_start|>system\n{system}<|im_end|>") and multiturn.count("<|im_start|>user") == 2
    assert res.data["settings"]["fewshot_as_multiturn"] is True and not res.data["timing"]["original"]["cached"]

    res = EvaluateStage(**_stage(num_fewshot=1, log_samples=True, apply_chat_template=True,
                                 fewshot_as_multiturn=False, system_instruction=system)).run(ctx)  # not from the cache
    raw, single = _prompt(ctx)
    assert raw["fewshot_as_multiturn"] is False and single.count("<|im_start|>user") == 1 and single != multiturn
    assert not res.data["timing"]["original"]["cached"]

    EvaluateStage(**_stage(num_fewshot=1, log_samples=True, system_instruction=system)).run(ctx)
    raw, plain = _prompt(ctx)
    assert raw["chat_template"] is None and "<|im_start|>" not in plain and plain.startswith(system)


@pytest.mark.parametrize("stage, message", [
    ({"fewshot_as_multiturn": True}, "`fewshot_as_multiturn: true` needs `apply_chat_template`"),
    ({"apply_chat_template": ""}, "`apply_chat_template` is an empty string"),
    ({"system_instruction": ""}, "system_instruction"),
    ({"tasks": [], "perplexity": {}, "apply_chat_template": True}, "`apply_chat_template` applies to lm-eval tasks"),
    ({"tasks": [], "perplexity": {}, "log_samples": True}, "`log_samples` applies to lm-eval tasks"),
    ({"tasks": ["lm_eval"]}, "reserved result key"),
])
def test_bad_prompt_options_name_the_fix(tiny_model_dir, stage, message):
    from llmcompress.recipe import load_recipe

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe({"name": "x", "model": str(tiny_model_dir), "stages": [_stage(**stage)]})


def test_chat_template_without_one_in_the_tokenizer_is_a_clear_error(tiny):
    import copy

    model, tok = tiny
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(LLMCompressError, match="has no chat template. Fix: set `apply_chat_template: false`"):
        harness.evaluate_tasks(model, bare, ["pydoc_cloze"], limit=1,
                               options=harness.PromptOptions(apply_chat_template=True))


def test_gguf_models_lm_applies_the_chat_template(tiny):
    from llmcompress.llamacpp.lm_eval_lm import LlamaCppLM

    _, tok = tiny
    lm = LlamaCppLM(SimpleNamespace(n_ctx=64), tok)
    chat = [{"role": "user", "content": "Hi"}]
    assert lm.apply_chat_template(chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert lm.chat_template(True) == tok.chat_template and lm.tokenizer_name
