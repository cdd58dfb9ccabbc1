"""GGUF runs in the app: the pool loads them without transformers (their hf engine says why), runs them (and, when
asked, every model) under the llamacpp backend, and the chat, its limits, the race and ``--backends`` handle that.

The llamacpp backend is a fake here (no llama.cpp build, no llama-server): ``FakeLlama`` below.
"""

from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path

import pytest

WORDS = ["Hello", " from", " llama", ".cpp", "!"]


class FakeServer:
    """What the app reads of a started llama-server: memory figures, readiness, its options."""

    label = "llama-server"

    def __init__(self, log: Path | None, slot_ctx: int):
        self.log_path, self.options = log, type("Options", (), {"slot_ctx": slot_ctx})()
        self.started_at, self.ready_s, self.peak_rss_bytes = time.perf_counter(), 0.25, 300 * 2**20
        self.closed = False

    def start(self) -> "FakeServer":
        return self

    def model_memory_bytes(self) -> int:
        return 70 * 2**20

    def close(self) -> None:
        self.closed = True


class FakeLlama:
    """A stand-in for ``LlamaCppBackend``: starts a ``FakeServer`` through the pool's ``engine`` (as the real one
    does, ``kind="llama-server"``), streams ``WORDS``, times nothing. Dense folders are Unservable when
    ``dense_unservable`` is set."""

    name = "llamacpp"
    title, server_label = "llama.cpp", "llama-server"
    opened: list[tuple[str, dict]] = []
    dense_unservable = False
    slot_ctx = 1024

    def __init__(self, server: FakeServer, what: str):
        self.server, self.what = server, what
        self.calls: list[list[dict]] = []

    @classmethod
    def open(cls, handle, ctx=None, **overrides) -> "FakeLlama":
        from llmcompress.serving.support import Unservable

        gguf = handle.meta.get("format") == "gguf"
        if not gguf and cls.dense_unservable:
            raise Unservable(f"`{handle.path}` is a quantized transformers folder; llama.cpp runs GGUF files. Fix: "
                             "quantize with `method: gguf`.")
        cls.opened.append((handle.role, overrides))
        server = ctx.engine(handle.path, overrides, lambda log: FakeServer(log, cls.slot_ctx), kind="llama-server")
        return cls(server, "Q4_K_M GGUF" if gguf else "F16 GGUF")

    def ready(self) -> "FakeLlama":
        return self

    def chat(self, messages, max_new_tokens=256, **sampling):
        self.calls.append(messages)
        yield from WORDS[:max_new_tokens]

    def describe(self) -> dict:
        return {"engine": "llama.cpp fake llama-server", "model": self.what, "threads": 1}

    def check(self, prompt_tokens, new_tokens, where) -> None:
        pass

    def prompts(self, batch, tokens):
        return [[1] * tokens for _ in range(batch)]

    def generate(self, prompt_ids, new_tokens):
        from llmcompress.backends.base import GenTiming

        return GenTiming(batch_size=len(prompt_ids), prompt_tokens=len(prompt_ids[0]), new_tokens=new_tokens,
                         ttft_s=0.01, decode_s=0.1, total_s=0.11)


@pytest.fixture
def fake_llama(monkeypatch, tmp_path):
    """``BACKENDS["llamacpp"]`` is ``FakeLlama`` (fresh records); the pool's server logs go under ``tmp_path``."""
    from llmcompress.backends import BACKENDS

    monkeypatch.setitem(BACKENDS._entries, "llamacpp", FakeLlama)
    monkeypatch.setattr(FakeLlama, "opened", [])
    monkeypatch.setenv("LLMCOMPRESS_CACHE", str(tmp_path / "cache"))
    return FakeLlama


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading any transformers model fails the test (a GGUF run must never be loaded that way)."""
    import llmcompress.backends.hf as hf
    import llmcompress.context as context
    import llmcompress.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a transformers model was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(context.ModelHandle, "load", refuse)
    monkeypatch.setattr(hf.HFBackend, "open", classmethod(refuse))


def _gguf_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A GGUF run's final model folder: the tiny llama's tokenizer and config.json, a dummy model.gguf."""
    folder = tmp_path / "gguf-q4" / "01-quantize" / "model"
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "generation_config.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copyfile(tiny_model_dir / name, folder / name)
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(4092))
    (folder / "llmcompress.json").write_text(json.dumps({"format": "gguf", "file": "model.gguf", "method": "gguf",
                                                         "gguf_type": "Q4_K_M"}))
    return folder


def _candidate(folder: Path):
    from llmcompress.ui.pool import Candidate

    return Candidate("gguf-q4", "compressed", folder, run_dir=folder.parents[1], method="gguf Q4_K_M")


def _original(tiny_model_dir: Path):
    from llmcompress.ui.pool import Candidate

    return Candidate("original", "original", tiny_model_dir, source="tiny-random-llama")


def _load(candidates, backends=("hf",), log=lambda m: None, **kw):
    from llmcompress.context import Runtime
    from llmcompress.ui.pool import ModelPool

    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    return ModelPool.load(candidates, runtime, backends, log=log, **kw)


def _settled(engine, timeout_s: float = 10.0):
    """The engine once its background start has ended (ready, or a reason)."""
    deadline = time.perf_counter() + timeout_s
    while engine.status() is not None and engine.reason is None and time.perf_counter() < deadline:
        time.sleep(0.02)
    return engine


def _last(iterator):
    return collections.deque(iterator, maxlen=1)[0]


@pytest.fixture
def gguf_pool(tmp_path, tiny_model_dir, fake_llama, no_model_loading):
    with _load([_candidate(_gguf_run(tmp_path, tiny_model_dir))], slots=8) as pool:
        _settled(pool.get("gguf-q4").engines["llamacpp"])
        yield pool


# ---- the pool


def test_the_pool_loads_a_gguf_run_without_transformers_and_runs_it_under_llamacpp(gguf_pool, tmp_path):
    entry = gguf_pool.get("gguf-q4")
    hf = entry.engines["hf"]
    assert hf.backend is None and "llama.cpp" in hf.status() and "pick the llamacpp backend" in hf.status()
    assert entry.tokenizer is not None and entry.tokenizer.chat_template  # the folder's own tokenizer
    assert entry.weights_bytes is None and entry.size_bytes == 4096 and entry.describe["dtype"] == "Q4_K_M GGUF"
    llama = entry.engines["llamacpp"]
    assert llama.status() is None and isinstance(llama.backend, FakeLlama)
    assert FakeLlama.opened == [("compressed", {"parallel": 8})]  # one slot per request of the largest race batch
    assert gguf_pool.backends == ["hf", "llamacpp"]
    logs = [s.log_path.name for s in gguf_pool.servers]
    assert len(logs) == 1 and logs[0].startswith("app-llama-server-") and logs[0].endswith("-01-quantize.log")


def test_closing_the_pool_stops_its_llama_servers_and_starts_no_more(gguf_pool):
    from llmcompress.errors import LLMCompressError

    server = gguf_pool.get("gguf-q4").engines["llamacpp"].backend.server
    gguf_pool.close()
    assert server.closed and gguf_pool.servers == []
    with pytest.raises(LLMCompressError, match="pool is closed.*Fix: restart the app"):
        gguf_pool.engine(Path("x/model.gguf"), None, lambda log: FakeServer(log, 8), kind="llama-server")


def test_the_original_runs_under_llamacpp_only_when_asked_for(tmp_path, tiny_model_dir, fake_llama):
    gguf = _candidate(_gguf_run(tmp_path, tiny_model_dir))
    with _load([_original(tiny_model_dir), gguf]) as pool:
        original = pool.get("original")
        assert "llamacpp" not in original.engines and original.engines["hf"].status() is None
        assert pool.backends == ["hf", "llamacpp"]  # the GGUF run brings the llamacpp backend anyway
    with _load([_original(tiny_model_dir), gguf], backends=("hf", "llamacpp")) as pool:
        engine = _settled(pool.get("original").engines["llamacpp"])
        assert engine.status() is None and engine.backend.what == "F16 GGUF"
        assert sorted(role for role, _ in FakeLlama.opened[-2:]) == ["compressed", "original"]


def test_a_model_llamacpp_cannot_run_gets_the_reason(tiny_model_dir, fake_llama, monkeypatch):
    monkeypatch.setattr(FakeLlama, "dense_unservable", True)
    with _load([_original(tiny_model_dir)], backends=("hf", "llamacpp")) as pool:
        engine = _settled(pool.get("original").engines["llamacpp"])
        assert engine.backend is None and engine.status().startswith("llama.cpp cannot run this model: ")
        assert "Fix: quantize with `method: gguf`" in engine.status()
        assert pool.backends == ["hf", "llamacpp"] and pool.servers == []


def test_a_gguf_run_without_llamacpp_set_up_says_how_to_set_it_up(tmp_path, tiny_model_dir, no_model_loading,
                                                                  monkeypatch):
    import llmcompress.llamacpp.runtime as runtime
    from llmcompress.errors import LLMCompressError

    def not_set_up(what):
        raise LLMCompressError(f"{what} needs llama.cpp, which is not set up. Fix: run `llmcompress setup llamacpp`")

    monkeypatch.setattr(runtime, "require", not_set_up)
    with _load([_candidate(_gguf_run(tmp_path, tiny_model_dir))]) as pool:
        engine = _settled(pool.get("gguf-q4").engines["llamacpp"])
        assert engine.status().startswith("the llama.cpp engine could not start: the llamacpp backend needs")
        assert "llmcompress setup llamacpp" in engine.status()


def test_a_gguf_run_without_tokenizer_files_still_chats(tmp_path, tiny_model_dir, fake_llama, no_model_loading):
    from llmcompress.ui.chat import ChatSession, Sampling, chat_turn
    from llmcompress.ui.config import Limits

    folder = _gguf_run(tmp_path, tiny_model_dir)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    logs: list[str] = []
    with _load([_candidate(folder)], log=logs.append) as pool:
        entry = pool.get("gguf-q4")
        assert entry.tokenizer is None and any("no tokenizer in" in m and "Fix:" in m for m in logs)
        _settled(entry.engines["llamacpp"])
        shown, _ = _last(chat_turn(pool, Limits(), ChatSession(), "hi", "", ["gguf-q4"], "llamacpp", Sampling()))
        assert shown["gguf-q4"][1]["content"] == "".join(WORDS)


def test_a_vllm_engine_refuses_a_gguf_run_with_the_reason(gguf_pool):
    from llmcompress.ui.pool import ModelPool

    engine = ModelPool._start_server(gguf_pool, gguf_pool.get("gguf-q4"), "vllm", log=lambda m: None)
    assert engine.backend is None and "GGUF" in engine.status() and "llamacpp backend" in engine.status()


# ---- chat, header, race


def test_chat_through_llamacpp_streams_the_reply_with_the_servers_memory(gguf_pool):
    from llmcompress.ui.chat import ChatSession, Sampling, chat_turn
    from llmcompress.ui.config import Limits

    session = ChatSession()
    shown, stats = _last(chat_turn(gguf_pool, Limits(), session, "hi", "Be brief.", ["gguf-q4"], "llamacpp",
                                   Sampling(max_new_tokens=8)))
    assert shown["gguf-q4"][1] == {"role": "assistant", "content": "".join(WORDS)}
    line = stats["gguf-q4"]
    assert "**done** (llamacpp)" in line and f"{len(WORDS)} tokens" in line
    assert "llama-server RSS 300.0 MiB (peak) · weights 70.0 MiB" in line
    backend = gguf_pool.get("gguf-q4").engines["llamacpp"].backend
    assert backend.calls[0][0] == {"role": "system", "content": "Be brief."}


def test_chat_on_hf_shows_why_a_gguf_run_did_not_answer(gguf_pool):
    from llmcompress.ui.chat import ChatSession, Sampling, chat_turn
    from llmcompress.ui.config import Limits

    shown, stats = _last(chat_turn(gguf_pool, Limits(), ChatSession(), "hi", "", ["gguf-q4"], "hf", Sampling()))
    assert "runs under llama.cpp" in shown["gguf-q4"][1]["content"] and "**not run** (hf)" in stats["gguf-q4"]


def test_a_gguf_runs_context_limit(gguf_pool):
    from llmcompress.ui.chat import ChatSession, Sampling, chat_turn, context_limit
    from llmcompress.ui.config import LimitExceeded, Limits

    entry = gguf_pool.get("gguf-q4")
    assert context_limit(entry) == 1024  # config.json's max_position_embeddings: there is no transformers model
    engine = entry.engines["llamacpp"]
    assert context_limit(entry, "llamacpp") == engine.backend.server.options.slot_ctx
    engine.backend.server.options.slot_ctx = 40  # the server's context per slot
    with pytest.raises(LimitExceeded, match="exceeds the model's context of 40"):
        _last(chat_turn(gguf_pool, Limits(), ChatSession(), "hello " * 20, "", ["gguf-q4"], "llamacpp",
                        Sampling(max_new_tokens=32)))


def test_the_header_and_about_say_how_a_gguf_run_runs(gguf_pool):
    from llmcompress.ui.app import _about
    from llmcompress.ui.chat import header
    from llmcompress.ui.config import AppConfig

    text = header(gguf_pool.get("gguf-q4"))
    assert "gguf Q4_K_M · Q4_K_M GGUF · **4.0 KiB** on disk" in text and "weights in memory" not in text
    assert "*hf: a Q4_K_M GGUF file runs under llama.cpp" in text
    about = _about(gguf_pool, AppConfig())
    assert "gguf-q4 · llamacpp: ready" in about and "gguf-q4 · hf: a Q4_K_M GGUF file" in about


def test_the_race_times_a_gguf_run_on_llamacpp(gguf_pool):
    from llmcompress.ui.config import Limits
    from llmcompress.ui.race import conditions_markdown, run_race

    result = run_race(gguf_pool, ["gguf-q4"], ["hf", "llamacpp"], batch=2, prompt_tokens=8, new_tokens=4,
                      limits=Limits())
    hf, llama = result.rows
    assert "runs under llama.cpp" in hf["note"] and "decode tok/s" not in hf
    assert llama["decode tok/s"] == pytest.approx(2 * 3 / 0.1) and llama["note"] == "Q4_K_M GGUF"
    text = conditions_markdown(result)
    assert "llamacpp: engine llama.cpp fake llama-server" in text and "Q4_K_M" not in text  # per model: in its row


# ---- --backends


@pytest.fixture
def no_vllm(monkeypatch):
    import llmcompress.serving.runtime as serving_runtime
    from llmcompress.errors import LLMCompressError

    def missing(where="vLLM"):
        raise LLMCompressError(f"{where} needs vLLM. Fix: run `llmcompress setup vllm`")

    monkeypatch.setattr(serving_runtime, "vllm_python", missing)


@pytest.fixture
def llamacpp_set_up(monkeypatch):
    """Set ``llamacpp_set_up(True/False)``: whether ``llmcompress.llamacpp.runtime.require`` passes."""
    import llmcompress.llamacpp.runtime as runtime
    from llmcompress.errors import LLMCompressError

    state = {"ok": True}

    def require(what):
        if not state["ok"]:
            raise LLMCompressError(f"{what} needs llama.cpp, which is not set up. Fix: run "
                                   "`llmcompress setup llamacpp`")
        return Path("/llamacpp")

    monkeypatch.setattr(runtime, "require", require)
    return lambda ok: state.update(ok=ok)


@pytest.mark.parametrize("set_up", [True, False])
def test_auto_leaves_llamacpp_to_gguf_runs(no_vllm, llamacpp_set_up, set_up):
    """auto never starts llama.cpp for every model (each dense one would cost an F16 copy): GGUF runs get it."""
    from llmcompress.ui.config import AppConfig
    from llmcompress.ui.launch import backends_of

    llamacpp_set_up(set_up)
    assert backends_of(AppConfig()) == ("hf",)


def test_an_explicit_llamacpp_must_be_set_up(no_vllm, llamacpp_set_up):
    from llmcompress.errors import LLMCompressError
    from llmcompress.ui.launch import backends_of, parse_args

    config = parse_args(["--backends", "hf,llamacpp"])
    assert config.backends == ("hf", "llamacpp") and backends_of(config) == ("hf", "llamacpp")
    assert backends_of(parse_args(["--backends", "llamacpp"])) == ("hf", "llamacpp")
    with pytest.raises(LLMCompressError, match="app --backends vllm needs vLLM.*setup vllm"):  # checked as before
        backends_of(parse_args(["--backends", "vllm,llamacpp"]))
    llamacpp_set_up(False)
    with pytest.raises(LLMCompressError, match=r"app --backends llamacpp needs llama.cpp.*llmcompress setup llamacpp"):
        backends_of(config)
    with pytest.raises(LLMCompressError, match=r"app: --backends: .*\(got 'llama'\)"):
        parse_args(["--backends", "hf,llama"])


def test_app_with_llamacpp_not_set_up_exits_2_with_the_fix(no_vllm, llamacpp_set_up, monkeypatch, capsys, tmp_path):
    import signal

    from llmcompress.ui.launch import main

    llamacpp_set_up(False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's SIGTERM handler stays out of this process
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert main(["--runs", str(tmp_path), "--backends", "llamacpp"]) == 2
    err = capsys.readouterr().err
    assert "error: app --backends llamacpp needs llama.cpp" in err and "llmcompress setup llamacpp" in err
    assert "Traceback" not in err


def test_the_app_gives_each_llama_server_a_slot_per_race_request():
    from llmcompress.ui.config import AppConfig, Limits
    from llmcompress.ui.launch import llamacpp_slots

    assert llamacpp_slots(AppConfig()) == 8
    assert llamacpp_slots(AppConfig(limits=Limits(race_max_batch=2, concurrency=3))) == 3
