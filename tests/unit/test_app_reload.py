"""`gradio app.py` (gradio's reload mode) as its users run it: the file's module-level `demo` is served, an edit to
the file rebuilds it while the models stay loaded, and `python app.py` still serves as before."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("gradio")


def _free_port() -> int:
    from llmcompress.serving.server import free_port

    return free_port("127.0.0.1")


def _title(url: str, timeout: float = 240.0, proc: subprocess.Popen | None = None) -> str:
    """The served app's title, once the server answers (fails with the process's output if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the app exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            r = httpx.get(f"{url}/config", timeout=5)
            if r.status_code == 200:
                return r.json().get("title", "")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"no answer from {url} in {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def test_gradio_reload_mode_serves_the_module_level_demo_and_rebuilds_it_on_an_edit(tiny_runs_dir, tmp_path):
    app = tmp_path / "app.py"  # a copy: the test edits it (the file only imports llmcompress)
    shutil.copy(ROOT / "app.py", app)
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    gradio_cli = [sys.executable, "-c", "import sys; from gradio.cli import cli; sys.argv[0] = 'gradio'; cli()"]
    proc = subprocess.Popen([*gradio_cli, str(app), "--", "--runs", str(tiny_runs_dir), "--no-default",
                             "--backends", "hf", "--threads", "1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        first = _title(url, proc=proc)
        assert first and first != "edited by the test"
        time.sleep(1.5)  # the watcher compares modification times
        with open(app, "a") as f:
            f.write('\nif __name__ == "__main__":\n    demo.title = "edited by the test"\n')
        deadline = time.monotonic() + 120
        while _title(url, proc=proc) != "edited by the test":
            assert time.monotonic() < deadline, "the edit was not picked up"
            time.sleep(1)
    finally:
        out = _stop(proc)
    before, after = out.split("Changes detected", 1)
    assert "loaded tiny-rtn" in before, out[-3000:]
    assert "failed" not in after.lower(), out[-3000:]  # gradio: "Reloading app failed with the following exception"
    assert "loaded " not in after, "the reload loaded the models again"
