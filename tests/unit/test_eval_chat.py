"""Chat answers in the evaluate stage: config, prompt file, greedy replies, scoring, the stage, report and app."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmcompress.errors import RecipeError
from llmcompress.eval.chat import (
    ChatConfig,
    ChatPrompt,
    Reply,
    answer_all,
    compare,
    first_divergence,
    is_correct,
    load_prompts,
    model_results,
    prompts_path,
    summary_line,
)

ROOT = Path(__file__).resolve().parents[2]


# one torch thread for every test here (tests/conftest.py): figures that do not depend on the thread count
pytestmark = pytest.mark.usefixtures("one_thread")


def _noisy_copy(src: Path, dst: Path, scale: float, seed: int) -> Path:
    import torch

    from llmcompress.models.loading import load_model

    model, tok = load_model(src, "cpu", "float32")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "llmcompress.json").write_text(json.dumps({"format": "hf", "method": "noise"}))
    return dst


@pytest.fixture(scope="module")
def talkative_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama with large noise on every weight (float32): its greedy replies vary from prompt to prompt and
    token to token (the tiny llama itself answers every prompt with the same whitespace token)."""
    return _noisy_copy(tiny_model_dir, tmp_path_factory.mktemp("talkative"), 0.2, seed=2)


@pytest.fixture(scope="module")
def compressed_dir(talkative_dir, tmp_path_factory) -> Path:
    """A stand-in for a compressed copy of ``talkative_dir``: a little more noise."""
    return _noisy_copy(talkative_dir, tmp_path_factory.mktemp("compressed"), 0.02, seed=3)


@pytest.fixture(scope="module")
def talkative(talkative_dir):
    """The talkative llama in float32 (batched and unbatched greedy agree bit for bit there)."""
    from llmcompress.models.loading import load_model

    return load_model(talkative_dir, "cpu", "float32")


def _ctx(tmp_path: Path, original: Path, stages: list[dict], compressed: Path | None = None):
    """A RunContext like ``make_ctx``'s (one thread, float32), on any original."""
    from llmcompress.context import ModelHandle, RunContext, Runtime
    from llmcompress.recipe import load_recipe

    recipe = load_recipe({"name": "t", "model": str(original), "threads": 1, "dtype": "float32", "stages": stages})
    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=recipe.seed)
    runtime.apply()
    orig = ModelHandle("original", original, runtime)
    current = ModelHandle("compressed", compressed, runtime) if compressed else orig
    run = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    (run / "01-stage").mkdir(parents=True)
    return RunContext(recipe=recipe, run_dir=run, runtime=runtime, original=orig, current=current,
                      stage_dir=run / "01-stage")


def _recipe(tiny_model_dir, chat, **stage):
    from llmcompress.recipe import load_recipe

    return load_recipe({"name": "x", "model": str(tiny_model_dir),
                        "stages": [{"type": "evaluate", "tasks": [], "perplexity": None, "chat": chat, **stage}]})


def _write(tmp_path: Path, lines: list[str] | str, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(lines if isinstance(lines, str) else "".join(line + "\n" for line in lines))
    return path


# --- config -----------------------------------------------------------------------------------------------------------


def test_chat_is_off_by_default_and_braces_take_the_defaults(tiny_model_dir):
    from llmcompress.eval.stage import EvaluateStage

    assert EvaluateStage().chat is None
    stage = _recipe(tiny_model_dir, {}).stages[0]
    assert stage.chat == ChatConfig() and stage.chat.prompts == "builtin:chat" and stage.chat.max_new_tokens == 24
    assert stage.tasks == [] and stage.perplexity is None  # a chat-only stage is something to do


@pytest.mark.parametrize("chat, message", [
    ({"promts": "p.jsonl"}, "Did you mean `prompts`"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"batch_size": 0}, "batch_size"),
    ({"limit": 0}, "limit"),
    ({"prompts": "builtin:chatt"}, "Did you mean `builtin:chat`"),
    ({"prompts": "prompts.txt"}, ".jsonl file"),
    ({"system": 5}, "system"),
    (5, "chat"),
])
def test_bad_chat_config_names_the_fix(tiny_model_dir, chat, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        _recipe(tiny_model_dir, chat)


def test_config_is_frozen():
    cfg = ChatConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.max_new_tokens = 3  # type: ignore[misc]


# --- the prompt file --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, fragments", [
    (['{"prompt": "a", "answer": "b"}', "{bad"], ["p.jsonl:2", "not valid JSON"]),
    (['["a", "b"]'], ["p.jsonl:1", "not an object"]),
    (['{"answer": "b"}'], ["p.jsonl:1", "no `prompt`", "Fix:"]),
    (['{"prompt": "  "}'], ["p.jsonl:1", "`prompt` is an empty string"]),
    (['{"prompt": 3}'], ["p.jsonl:1", "`prompt` is an integer"]),
    (['{"prompt": "a"}', '{"prompt": "b", "answer": 5}'], ["p.jsonl:2", "`answer` is an integer (5)", '`"5"`']),
    (['{"prompt": "a", "answer": ""}'], ["p.jsonl:1", "`answer` is an empty string"]),
    (['{"prompt": "a", "kind": ["x"]}'], ["p.jsonl:1", "`kind`"]),
    (['{"prompt": "a", "anwser": "b"}'], ["p.jsonl:1", "unknown key `anwser`", "Did you mean `answer`?"]),
    (['{"prompt": "a"}', "", '{"prompt": "a"}'], ["p.jsonl:3", "same prompt as line 1"]),
    ([], ["p.jsonl", "has no rows"]),
    (["", "   "], ["p.jsonl", "has no rows"]),
])
def test_bad_prompt_file_names_the_line_and_the_fix(tmp_path, lines, fragments):
    _write(tmp_path, lines)
    with pytest.raises(RecipeError) as e:
        load_prompts(ChatConfig(prompts="p.jsonl"), tmp_path)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert "Fix:" in str(e.value)


def test_missing_folder_and_binary_prompt_files(tmp_path):
    with pytest.raises(RecipeError, match=r"gone\.jsonl` does not exist.*Fix:"):
        load_prompts(ChatConfig(prompts="gone.jsonl"), tmp_path)
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(RecipeError, match="is not a regular file"):
        load_prompts(ChatConfig(prompts="d.jsonl"), tmp_path)
    (tmp_path / "b.jsonl").write_bytes(bytes(range(256)))
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_prompts(ChatConfig(prompts="b.jsonl"), tmp_path)


def test_rows_limit_and_paths(tmp_path):
    _write(tmp_path, ['{"prompt": "a", "answer": "x", "kind": "k"}', '{"prompt": "b"}', '{"prompt": "c"}'])
    rows = load_prompts(ChatConfig(prompts="p.jsonl"), tmp_path)
    assert rows == [ChatPrompt("a", "x", "k"), ChatPrompt("b"), ChatPrompt("c")]
    assert [r.prompt for r in load_prompts(ChatConfig(prompts="p.jsonl", limit=2), tmp_path)] == ["a", "b"]
    absolute = str(tmp_path / "p.jsonl")
    assert len(load_prompts(ChatConfig(prompts=absolute), None)) == 3
    assert prompts_path("builtin:chat") == ROOT / "llmcompress" / "evals" / "chat" / "default.jsonl"


# --- the default prompt set -------------------------------------------------------------------------------------------


def test_default_set_is_large_mixed_unique_and_rebuilds_byte_for_byte():
    rows = load_prompts(ChatConfig())
    kinds = {r.kind for r in rows}
    assert len(rows) >= 300 and {"facts", "arithmetic", "instructions"} <= kinds
    assert all(sum(r.kind == k for r in rows) >= 60 for k in kinds)
    assert len({r.prompt for r in rows}) == len(rows) and all(r.answer for r in rows)
    france = next(r for r in rows if r.prompt == "What is the capital of France?")
    assert france.answer == "Paris" and france.kind == "facts"
    assert {r.kind for r in rows[:20]} == kinds  # shuffled: `limit` takes some of each kind

    spec = importlib.util.spec_from_file_location("chat_build", ROOT / "llmcompress" / "evals" / "chat" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build.build())
    assert text == (ROOT / "llmcompress" / "evals" / "chat" / "default.jsonl").read_text(encoding="utf-8")
    assert build.contains("The answer is 12.", "12") == is_correct("12", "The answer is 12.")  # the same rule


def test_default_set_answers_are_not_given_away_and_not_in_the_training_data():
    rows = load_prompts(ChatConfig())
    echoes = [r for r in rows if is_correct(r.answer, r.prompt)]
    assert echoes and all(r.kind == "instructions" and re.match(r"(Repeat|Please repeat|Say)", r.prompt)
                          for r in echoes)  # only "repeat this" prompts contain their answer
    # calibration and training text: the recipes' data files and any prompt/seed lists shipped for calibration
    files = sorted((ROOT / "recipes" / "data").glob("*.jsonl")) + sorted((ROOT / "llmcompress" / "data").glob("*.txt"))
    assert files
    data = " ".join(f.read_text(encoding="utf-8") for f in files).casefold()
    assert not [r.prompt for r in rows if r.prompt.casefold() in data]


# --- scoring ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, reply, expected", [
    ("Paris", "The capital of France is Paris.", True),
    ("paris", "PARIS!", True),
    ("12", "7 + 5 = 12", True),
    ("12", "The answer is 123.", False),
    ("12", "112", False),
    ("cat", "concatenate", False),
    ("good morning", "Good   morning, friend", True),
    ("blue whale", "the blue\nwhale", True),
    ("Au", "The symbol is Au.", True),
    ("Au", "audio", False),
    (None, "anything", None),
])
def test_a_reply_is_right_when_it_contains_the_answer_as_a_whole_word(answer, reply, expected):
    assert is_correct(answer, reply) is expected


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([5], [6]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped earlier: they differ where it stopped
    assert first_divergence([], [4]) == 0


def _replies(*texts_ids) -> list[Reply]:
    return [Reply(text, tuple(ids)) for text, ids in texts_ids]


def test_scoring_counts_flips_gains_agreement_and_divergence():
    rows = [ChatPrompt("q1", "yes", "a"), ChatPrompt("q2", "4", "a"), ChatPrompt("q3", "x", "b"),
            ChatPrompt("q4", "y", "b"), ChatPrompt("q5")]
    orig = model_results(rows, _replies(("yes", [1, 2]), ("it is 4", [3, 4, 5]), ("no", [6]), ("y!", [7, 8]),
                                        ("free", [9, 9, 9])))
    comp = model_results(rows, _replies(("yes", [1, 2]), ("it is 5", [3, 4, 6]), ("x", [1]), ("y?", [7, 0]),
                                        ("freed", [9, 9, 9, 9])))
    assert orig["n"] == 5 and orig["n_with_answer"] == 4 and orig["correct"] == 3 and orig["accuracy"] == 0.75
    assert orig["by_kind"] == {"a": {"n_with_answer": 2, "correct": 2, "accuracy": 1.0},
                               "b": {"n_with_answer": 2, "correct": 1, "accuracy": 0.5}}
    assert [r["correct"] for r in orig["replies"]] == [True, True, False, True, None]
    assert orig["replies"][1] == {"text": "it is 4", "ids": [3, 4, 5], "correct": True}
    assert comp["correct"] == 3  # one flip, one gain: the accuracy alone hides both

    c = compare(rows, orig, comp)
    assert c["flips"] == 1 and c["gains"] == 1
    assert c["flipped"] == [{"index": 1, "kind": "a", "prompt": "q2", "answer": "4", "original": "it is 4",
                             "compressed": "it is 5"}]
    assert c["gained"][0]["prompt"] == "q3" and c["gained"][0]["compressed"] == "x"
    assert c["identical"] == 1 and c["exact_agreement"] == pytest.approx(1 / 5)
    # differing replies: q2 at 2, q3 at 0, q4 at 1, q5 at 3 (a prefix); q1 is identical and not counted
    assert c["diverged"] == 4 and c["mean_first_divergence"] == pytest.approx((2 + 0 + 1 + 3) / 4)

    same = compare(rows, orig, orig)
    assert same["flips"] == same["gains"] == 0 and same["exact_agreement"] == 1.0
    assert same["mean_first_divergence"] is None and same["diverged"] == 0
    assert compare(rows, orig, comp, max_listed=0)["flipped"] == [] and c["flips"] == 1  # counts stay exact

    assert summary_line(orig, {**comp, **c}) == "correct 3 -> 3 of 4; 1 flip, 1 gain; 20% identical replies"
    assert summary_line(orig, None) == "correct 3 of 4 (original only)"


def test_no_answers_at_all():
    rows = [ChatPrompt("q1"), ChatPrompt("q2")]
    res = model_results(rows, _replies(("a", [1]), ("b", [2])))
    assert res["n_with_answer"] == 0 and res["correct"] == 0 and res["accuracy"] is None and res["by_kind"] == {}
    assert summary_line(res, None) == "correct 0 (no answers given) (original only)"


# --- generation -------------------------------------------------------------------------------------------------------


def test_batched_greedy_equals_unbatched_and_stops_at_eos(talkative):
    model, tok = talkative
    rows = [ChatPrompt("What is the capital of France?"), ChatPrompt("Hi"),
            ChatPrompt("Repeat after me: a much longer prompt than the others, so that the batch is left-padded"),
            ChatPrompt("What is 2 + 3?")]
    side = tok.padding_side
    batched = answer_all(model, tok, rows, ChatConfig(max_new_tokens=8, batch_size=4))
    single = answer_all(model, tok, rows, ChatConfig(max_new_tokens=8, batch_size=1))
    assert batched == single and tok.padding_side == side  # the tokenizer is left as it was
    assert len({r.ids for r in batched}) == len(rows)  # four different replies: the equality means something
    assert all(0 < len(r.ids) <= 8 or r.text == "" for r in batched)
    assert all(tok.eos_token_id not in r.ids for r in batched)
    assert [r.text for r in batched] == [tok.decode(list(r.ids), skip_special_tokens=True).strip() for r in batched]
    seen = []
    answer_all(model, tok, rows, ChatConfig(max_new_tokens=2, batch_size=3), progress=seen.append)
    assert seen == [3, 1]


def test_replies_stop_at_the_models_eos(talkative):
    from llmcompress.eval.chat import generate_greedy

    model, tok = talkative
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    free = generate_greedy(model, tok, [prompt], 6)[0]
    assert free, "the tiny model's first greedy token should not be EOS"

    class Stops:  # the same model, whose EOS is the first token it generates
        def __init__(self, m):
            self.m = m
            self.generation_config = type("G", (), {"eos_token_id": [free[0]]})()

        def parameters(self):
            return self.m.parameters()

        def generate(self, **kw):
            return self.m.generate(**kw)

    assert generate_greedy(Stops(model), tok, [prompt], 6) == [[]]


def test_an_engine_with_greedy_text_answers_one_prompt_at_a_time(talkative):
    _, tok = talkative
    calls = []

    class Engine:  # duck-typed like LlamaCppModel: no transformers generate
        def greedy_text(self, ids, max_tokens, stop):
            calls.append((list(ids), max_tokens, stop))
            return " Paris. "

    rows = [ChatPrompt("What is the capital of France?", "Paris"), ChatPrompt("Hi")]
    replies = answer_all(Engine(), tok, rows, ChatConfig(max_new_tokens=5))
    assert [r.text for r in replies] == ["Paris.", "Paris."] and len(calls) == 2
    assert calls[0][1] == 5 and calls[0][2] == [tok.eos_token]
    assert replies[0].ids == tuple(tok("Paris.", add_special_tokens=False)["input_ids"])
    system = answer_all(Engine(), tok, rows[:1], ChatConfig(system="Be brief."))
    assert system == replies[:1] and len(calls[-1][0]) > len(calls[0][0])  # the system message is in the prompt


def test_a_tokenizer_without_chat_template_is_refused(talkative):
    model, tok = talkative

    class Plain:
        chat_template = None

    with pytest.raises(RecipeError, match="no chat template.*Fix:"):
        answer_all(model, Plain(), [ChatPrompt("Hi")], ChatConfig())


# --- the stage --------------------------------------------------------------------------------------------------------


def _chat_stage(prompts: str, **chat) -> dict:
    return {"type": "evaluate", "tasks": [], "perplexity": None, "kl": False,
            "chat": {"prompts": prompts, "max_new_tokens": 6, "batch_size": 4, **chat}}


def test_stage_end_to_end_with_flips(talkative_dir, compressed_dir, tmp_path):
    prompts = _write(tmp_path, [json.dumps({"prompt": p, "kind": "k"}) for p in
                                ["What is the capital of France?", "What is 2 + 3?", "Say hello.",
                                 "What colour is the sky?", "Name a planet.", "Spell cat backwards."]])
    # 1. the original alone: its replies (the same model on both sides: no flips, "original only")
    ctx = _ctx(tmp_path, talkative_dir, [_chat_stage(str(prompts))])
    first = ctx.recipe.stages[0].run(ctx)
    orig = first.data["original"]["chat"]
    assert first.data["compressed"] == first.data["original"] and "flips" not in first.data["compressed"]["chat"]
    assert orig["n"] == 6 and orig["n_with_answer"] == 0 and first.summary["chat"].endswith("(original only)")

    # 2. answers = the original's own replies: it is right on every row with a reply; the noisy copy flips some
    texts = [r["text"] for r in orig["replies"]]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    assert len(keep) >= 4 and len(set(texts)) >= 4
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    _write(tmp_path, [json.dumps({**rows[i], "answer": texts[i]}) for i in keep], "answers.jsonl")
    ctx = _ctx(tmp_path, talkative_dir, [_chat_stage(str(tmp_path / "answers.jsonl"))], compressed_dir)
    res = ctx.recipe.stages[0].run(ctx)
    o, c = res.data["original"]["chat"], res.data["compressed"]["chat"]
    assert o["correct"] == o["n_with_answer"] == len(keep) and o["accuracy"] == 1.0
    assert c["flips"] >= 1 and c["flips"] == len(keep) - c["correct"] and c["gains"] == 0
    assert {f["index"] for f in c["flipped"]} == {i for i, r in enumerate(c["replies"]) if not r["correct"]}
    assert 0 <= c["exact_agreement"] < 1 and c["diverged"] >= c["flips"]
    assert 0 <= c["mean_first_divergence"] < 6
    assert all(len(r["ids"]) <= 6 for r in o["replies"] + c["replies"])
    s = res.data["settings"]
    assert s["chat"]["max_new_tokens"] == 6 and s["chat_fingerprint"] and "tasks_fingerprint" in s
    assert res.data["timing"]["original"]["cached"] is False and res.data["timing"]["compressed"]["chat_s"] > 0
    assert res.summary["chat"].startswith(f"correct {len(keep)} -> {c['correct']} of {len(keep)}; {c['flips']} flip")
    assert set(res.summary) == {"chat"}
    json.dumps(res.model_dump())

    # 3. again: the original's replies come from the cache; another prompt file is another cache entry
    again = ctx.recipe.stages[0].run(ctx)
    assert again.data["timing"]["original"]["cached"] is True and again.data["original"] == res.data["original"]
    assert again.data["compressed"]["chat"]["flips"] == c["flips"]

    # 4. the report: chat figures per model, the comparison and the flipped answers, in JSON and Markdown
    from llmcompress.report import build_report, render_markdown

    report = build_report(ctx.recipe, {"device": "cpu", "threads": 1},
                          [{"index": 0, "dir": "01-evaluate", "config": ctx.recipe.stages[0], "result": res}],
                          {"path": "orig"}, {"path": "comp"})
    assert "chat" not in report["models"]["original"]["eval"]  # not a task: its own section
    assert report["models"]["compressed"]["chat"]["correct"] == c["correct"]
    assert report["comparison"]["chat"]["flips"] == c["flips"]
    md = render_markdown(report)
    assert "### Chat answers" in md and "#### Flipped answers" in md and f"**{c['flips']} flips**" in md


def test_preflight_reads_the_prompt_file_before_any_weights(tiny_model_dir, tmp_path):
    from llmcompress.pipeline import preflight
    from llmcompress.recipe import load_recipe

    _write(tmp_path, ['{"prompt": "a"}', '{"prompt": "b", "answer": 2}'])
    (tmp_path / "r.yaml").write_text(f"name: r\nmodel: {tiny_model_dir}\nstages:\n"
                                     "  - {type: evaluate, tasks: [], perplexity: null, chat: {prompts: p.jsonl}}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\].*p\.jsonl:2: `answer` is an integer"):
        preflight(load_recipe(tmp_path / "r.yaml"))


# --- report, console table and app ------------------------------------------------------------------------------------


def _report_with_flips(n_flips: int, dtype: str = "float32") -> dict:
    from llmcompress.report import build_report

    rows = [ChatPrompt(f"q{i}", "right", "facts" if i % 2 else "arithmetic") for i in range(n_flips + 4)]
    orig = model_results(rows, [Reply("right", (1,)) for _ in rows])
    comp = model_results(rows, [Reply("wrong | twice\nover", (2,)) for _ in range(n_flips)]
                         + [Reply("right", (1,)) for _ in range(4)])
    comp.update(compare(rows, orig, comp))
    settings = {"chat": ChatConfig().model_dump(), "chat_fingerprint": "f", "device": "cpu"}
    result = {"type": "evaluate", "label": "evaluate",
              "data": {"settings": settings, "original": {"chat": orig}, "compressed": {"chat": comp}}}
    return build_report({"name": "r"}, {"device": "cpu", "threads": 1, "dtype": dtype},
                        [{"index": 0, "dir": "01-evaluate", "config": {"type": "evaluate"}, "result": result}],
                        {"path": "a"}, {"path": "b"})


def test_markdown_lists_at_most_ten_flips_and_points_to_the_json():
    from llmcompress.report import render_markdown

    report = _report_with_flips(12)
    cmp = report["comparison"]["chat"]
    assert cmp["flips"] == 12 and len(cmp["flipped"]) == 12 and cmp["accuracy"]["change"] == "-75.0 pts"
    assert report["models"]["original"]["chat"] == {"n": 16, "n_with_answer": 16, "correct": 16, "accuracy": 1.0,
                                                    "by_kind": {"arithmetic": {"n_with_answer": 8, "correct": 8,
                                                                               "accuracy": 1.0},
                                                                "facts": {"n_with_answer": 8, "correct": 8,
                                                                          "accuracy": 1.0}}}
    md = render_markdown(report)
    section = md.split("### Chat answers")[1].split("\n## ")[0]
    assert "| correct | 16 of 16 (100.0%) | 4 of 16 (25.0%) | -75.0 pts |" in section
    assert "| … facts | 8 of 8 (100.0%) |" in section
    assert "**12 flips** (right before, wrong after), 0 gains" in section
    assert md.split("## Quality")[1].startswith("\n\n### Chat answers")  # no empty task table before it
    assert "25% of the replies are identical to the original's (4 of 16)" in section
    assert "first diverge at generated token 0.0 on average" in section
    assert "`builtin:chat`" in section and "at most 24 new tokens" in section
    assert "Measured on CPU, fp32, 1 thread." in section
    table = section.split("#### Flipped answers")[1]
    assert table.count("| q") == 10 and "and 2 more in report.json" in table
    assert "wrong \\| twice over" in table  # pipes escaped, line breaks flattened
    assert "share its batch" not in section
    bf16 = render_markdown(_report_with_flips(1, "bfloat16")).split("### Chat answers")[1]
    assert "In bf16, a reply can depend on which prompts share its batch" in bf16
    assert "and 0 more" not in bf16 and "… and" not in bf16


def test_console_table_and_app_show_the_flips(tmp_path):
    from rich.console import Console

    from llmcompress.report import summary_table
    from llmcompress.ui.reports import RunInfo, chat_flips

    report = _report_with_flips(3)
    console = Console(record=True, width=160)
    console.print(summary_table(report))
    out = console.export_text()
    assert re.search(r"chat correct ↑\s+│\s+7/7\s+│\s+4/7\s+│ -42.9 pts", out)
    assert re.search(r"chat flips ↓\s+│\s+—\s+│\s+3\s+│ 0 gains, 57% identical", out)

    runs = [RunInfo("r", tmp_path, report), RunInfo("plain", tmp_path, {"comparison": {}})]
    line, frame = chat_flips(runs, "r")
    assert "**3 flips**" in line and "correct 7 → 4 of 7" in line
    assert list(frame.columns) == ["row", "kind", "prompt", "expected", "original's reply",
                                   "compressed model's reply"]
    assert frame.iloc[0].tolist() == ["1", "arithmetic", "q0", "right", "right", "wrong | twice\nover"]
    assert chat_flips(runs, "plain") == ("", None) and chat_flips(runs, "nope") == ("", None)
    assert chat_flips([RunInfo("odd", tmp_path, {"comparison": {"chat": {"flips": "x"}}})], "odd") == ("", None)
