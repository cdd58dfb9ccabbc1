"""``build_app(pool, config)``: the whole app as a ``gr.Blocks`` (tests build it without launching), and ``launch``.

Tabs: Chat (side by side, streamed), Throughput race, Reports, About. The request queue (concurrency limit, bounded
size) is set here, so a launched app and a tested one behave the same.
"""

from __future__ import annotations

import os
from typing import Any

from ..report.metrics import fmt_bytes
from .config import AppConfig
from .paths import Redactor
from .pool import ModelPool

TITLE = "llmcompress — original vs compressed"
CSS = """
.llmc-diverge { background: #ffd2d2; color: inherit; border-bottom: 2px solid #d33; padding: 0 1px; }
.llmc-stats { font-size: 0.85em; min-height: 4.5em; }
.llmc-header { font-size: 0.9em; }
"""


def _intro(pool: ModelPool) -> str:
    names = ", ".join(f"**{e.key}**" for e in pool.entries)
    return (f"# {TITLE}\nThe same prompt goes to every model; replies stream side by side with their speed and memory. "
            f"Loaded: {names} (device {pool.runtime.device}, {pool.runtime.dtype}, {pool.runtime.threads} torch "
            f"thread(s) per model). Greedy mode marks where a compressed reply first differs from the original's.")


def _about(pool: ModelPool, config: AppConfig) -> str:
    lim = config.limits
    lines = ["## Models", "", "| model | made by | on disk | weights in memory | from |", "|---|---|---|---|---|"]
    for e in pool.entries:
        lines.append(f"| {e.key} | {e.method or e.role} | {fmt_bytes(e.size_bytes)} | "
                     f"{fmt_bytes(e.weights_bytes) if e.weights_bytes else '—'} | "
                     f"`{e.run_dir.name if e.run_dir else e.path.name}` |")
    if pool.skipped:
        lines += ["", "Not loaded for chat:", ""] + [f"- {s}" for s in pool.skipped]
    lines += ["", "## Engines", ""]
    for e in pool.entries:
        for name, engine in e.engines.items():
            lines.append(f"- {e.key} · {name}: {engine.status() or 'ready'}")
    lines += ["", "## Limits", "",
              f"- a message: at most {lim.max_prompt_chars:,} characters; a conversation: "
              f"{lim.max_conversation_chars:,} characters or {lim.max_turns} turns (then Clear)",
              f"- new tokens per reply: at most {lim.max_new_tokens}; a chat request stops after {lim.timeout_s:.0f} s",
              f"- {lim.concurrency} chat request(s) generate at once; up to {lim.queue_size} request(s) of any kind "
              "(chat, race, reports) wait in the app's one queue, more are refused with a message (try again "
              "shortly)",
              f"- throughput race: batch ≤ {lim.race_max_batch}, prompt ≤ {lim.race_max_prompt_tokens} tokens, "
              f"new tokens ≤ {lim.race_max_new_tokens}; one race at a time",
              "", "Visitors choose only among the models loaded at launch; no remote code is ever run "
              "(`trust_remote_code` is off). The app takes no files (uploads are refused) and shows only files "
              "inside each run's folder. Analytics are off."]
    return "\n".join(lines)


def build_app(pool: ModelPool, config: AppConfig | None = None):
    """The app as a ``gr.Blocks`` with its queue configured (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from .chat import build_chat_tab
    from .race import build_race_tab
    from .reports import build_reports_tab

    config = config or AppConfig()
    redact = Redactor(config.runs_dir)  # visitors see paths relative to the runs folder, never the server's own
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(redact(_intro(pool)))
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(pool, config.limits, redact)
            with gr.Tab("Throughput race", id="race"):
                build_race_tab(pool, config.limits, redact)
            with gr.Tab("Reports", id="reports"):
                reports = build_reports_tab(config.runs_dir)
            with gr.Tab("About", id="about"):
                about = gr.Markdown(redact(_about(pool, config)))
        demo.load(reports["load"], outputs=reports["outputs"], api_visibility="private")
        demo.load(lambda: redact(_about(pool, config)), outputs=[about], api_visibility="private")  # live status
    demo.queue(default_concurrency_limit=config.limits.concurrency, max_size=config.limits.queue_size)
    return demo


#: Gradio's routes that store a visitor's file (under ``/gradio_api``): the app takes no files, so they are closed.
UPLOAD_ROUTES = ("/upload", "/process_recording")


class NoUploads:
    """ASGI middleware: refuses (403, before any byte of the body is read) every request that would store a file:
    gradio's upload routes and any multipart body. The app has no file input, so a visitor never needs one."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and _is_upload(scope):
            from starlette.responses import PlainTextResponse

            response = PlainTextResponse("This app takes no files: uploads are turned off.", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_upload(scope: dict) -> bool:
    path = scope.get("path", "").rstrip("/")
    if any(path.endswith("/gradio_api" + route) for route in UPLOAD_ROUTES):
        return True
    headers = dict(scope.get("headers") or [])
    return headers.get(b"content-type", b"").lower().lstrip().startswith(b"multipart/")


def launch(demo: Any, config: AppConfig, block: bool = True) -> tuple[Any, str]:
    """Start serving ``demo`` on ``config.host:config.port``; ``block=False`` returns at once (tests).

    Uploads are turned off (``NoUploads``). Returns ``(demo, local url)``.
    """
    from starlette.middleware import Middleware

    _, url, _ = demo.launch(server_name=config.host, server_port=config.port or None, css=CSS, show_error=False,
                            prevent_thread_lock=not block, quiet=not block, footer_links=["api", "settings"],
                            max_file_size="1mb", app_kwargs={"middleware": [Middleware(NoUploads)]})
    return demo, url
