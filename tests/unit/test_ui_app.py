"""The running app on 127.0.0.1, driven through gradio_client: both columns answer the same prompt; limits and a
full queue are refused with a message; the race and the report browser answer."""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from gradio_helpers import close
from ui_fakes import SlowBackend


def _serve(pool, runs_dir, **limits):
    from llmcompress.serving.server import free_port
    from llmcompress.ui.app import build_app, launch
    from llmcompress.ui.config import AppConfig, Limits

    config = AppConfig(runs_dir=runs_dir, port=free_port(), limits=Limits(**limits))
    demo, url = launch(build_app(pool, config), config, block=False)
    return demo, url


@pytest.fixture(scope="module")
def tiny_app(tiny_pool, tiny_runs_dir):
    demo, url = _serve(tiny_pool, tiny_runs_dir, max_new_tokens=32, default_new_tokens=8, max_prompt_chars=200)
    yield url
    close(demo)


def _chat(client, prompt, keys, greedy=False, max_new_tokens=8):
    return client.predict(prompt, "You are helpful.", keys, "hf", greedy, 1.0, 0.95, max_new_tokens, False,
                          api_name="/chat")


def _last_reply(chatbot) -> str:
    msg = chatbot[-1]
    assert msg["role"] == "assistant"
    content = msg["content"]
    return content if isinstance(content, str) else "".join(c.get("text", "") for c in content)


def test_build_app_returns_blocks_with_the_named_endpoints(tiny_pool, tiny_runs_dir):
    import gradio as gr

    from llmcompress.ui.app import build_app
    from llmcompress.ui.config import AppConfig

    demo = build_app(tiny_pool, AppConfig(runs_dir=tiny_runs_dir))
    assert isinstance(demo, gr.Blocks) and demo.analytics_enabled is False
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {"chat", "clear", "race", "reports", "report"} <= names
    assert demo._queue.max_size == 16 and demo._queue.default_concurrency_limit == 2
    from llmcompress.ui.app import _about

    assert "up to 16 request(s) of any kind (chat, race, reports)" in _about(tiny_pool, AppConfig())  # one queue


def test_both_columns_answer_the_same_prompt(tiny_app, tiny_pool):
    from gradio_client import Client

    client = Client(tiny_app, verbose=False)
    out = _chat(client, "What is a list?", tiny_pool.keys())
    n = len(tiny_pool.keys())
    _, chatbots, stats = out[0], out[1:1 + n], out[1 + n:]
    for chatbot, line in zip(chatbots, stats):
        assert chatbot[0]["role"] == "user" and "What is a list?" in str(chatbot[0]["content"])
        assert _last_reply(chatbot).strip()
        assert "**done** (hf)" in line and "tok/s" in line and "TTFT" in line
    second = _chat(client, "And a tuple?", tiny_pool.keys())  # the session keeps the conversation
    assert len(second[1]) == 4


def test_an_over_limit_prompt_is_refused_with_its_limit(tiny_app, tiny_pool):
    from gradio_client import Client

    client = Client(tiny_app, verbose=False)
    with pytest.raises(Exception, match="at most 200 characters"):
        _chat(client, "x" * 201, tiny_pool.keys())
    with pytest.raises(Exception, match="greater than maximum value 32"):  # the slider's own bound
        _chat(client, "hi", tiny_pool.keys(), max_new_tokens=33)


def test_race_and_reports_endpoints_answer(tiny_app):
    from gradio_client import Client

    client = Client(tiny_app, verbose=False)
    plot, conditions, table = client.predict(["original", "tiny-rtn"], ["hf"], 1, 8, 4, api_name="/race")
    assert "batch **1**" in conditions and len(table["data"]) == 2
    note, board, figure, pick = client.predict(api_name="/reports")
    assert "1 run folder" in note and [row[0] for row in board["data"]] == ["original", "tiny-rtn"]
    assert figure["type"] == "matplotlib" and pick["value"] == "tiny-rtn"
    text, plots = client.predict("tiny-rtn", api_name="/report")
    assert "tiny-rtn" in text and len(plots) == 1


def test_a_full_queue_refuses_cleanly_and_loses_nothing(make_fake_pool, tiny_runs_dir):
    from gradio_client import Client

    pool = make_fake_pool({"original": SlowBackend(["tok "] * 20, 0.05), "q": SlowBackend(["tok "] * 20, 0.05)})
    demo, url = _serve(pool, tiny_runs_dir, concurrency=1, queue_size=1)
    try:
        clients = [Client(url, verbose=False) for _ in range(5)]

        def ask(client):
            t0 = time.perf_counter()
            try:
                out = _chat(client, "hi", ["original", "q"], max_new_tokens=20)
                return "answered", _last_reply(out[1]), time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - the refusal is what this test looks at
                return "refused", str(e), time.perf_counter() - t0

        with cf.ThreadPoolExecutor(5) as ex:
            results = list(ex.map(ask, clients))
    finally:
        close(demo)
    answered = [r for r in results if r[0] == "answered"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(answered) + len(refused) == 5
    assert answered and all(r[1].strip() == ("tok " * 20).strip() for r in answered)
    assert refused and all("queue is full" in r[1].lower() for r in refused), results
