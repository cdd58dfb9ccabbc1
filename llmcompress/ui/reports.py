"""The report browser: every run folder's report (its report.md and plots), and all runs on one size vs quality vs
speed scatter with the Pareto front (``llmcompress.report.leaderboard``: the same rows and front sweeps use), and
for a run whose evaluate stage had ``chat:``, the chat answers that flipped.

Visitors pick a run by name among those found under the runs directory; no path ever comes from the browser. The
files shown are only those inside the run's own folder (``paths.run_file``: report.json can name any path), and
every text shown has the runs folder's absolute path written relative to it (``paths.Redactor``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LLMCompressError
from .paths import Redactor, run_file
from .pool import find_runs, run_names

_IMAGE_LINE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$", re.MULTILINE)
#: The most of a report.md the page shows (a run folder's file could be huge).
MAX_MARKDOWN_BYTES = 1 << 20


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    report: dict | None
    error: str | None = None  # why it has no report (unfinished run, unreadable file)


def scan(runs_dir: Path) -> list[RunInfo]:
    """Every run folder under ``runs_dir`` with its report (or why it has none)."""
    from ..report import load_report
    from ..report.io import REPORT_JSON

    out = []
    runs = find_runs(runs_dir)
    redact = Redactor(runs_dir)
    for path, name in zip(runs, run_names(runs, runs_dir)):  # the names the chat columns and --run use
        found, why = run_file(path, REPORT_JSON)
        if found is None and os.path.lexists(path / REPORT_JSON):  # there, but a symlink out of the run (or odd)
            out.append(RunInfo(name, path, None, f"its {REPORT_JSON} is not shown: {why}"))
            continue
        try:
            report = load_report(path)
        except LLMCompressError as e:
            out.append(RunInfo(name, path, None, redact(str(e))))
            continue
        out.append(RunInfo(name, path, report))
    return out


def leaderboard(runs: list[RunInfo]) -> tuple[list[dict], list[bool]]:
    """One row per distinct original and one per run, and which rows are on the Pareto front."""
    from ..report.leaderboard import original_row, pareto_front, run_row

    rows, originals = [], set()
    for run in runs:
        if run.report is None:
            continue
        try:  # a hand-edited report.json of the wrong shape leaves its run out of the table, not the whole tab
            base = ((run.report.get("models") or {}).get("original") or {}).get("path")
            new = [] if base in originals else [{**original_row(run.report), "name": "original" if not originals
                                                 else f"original ({Path(str(base)).name})"}]
            if not run.report.get("same_model"):
                new.append({**run_row(run.report, run.path), "name": run.name})
        except (AttributeError, TypeError, ValueError):
            continue
        originals.add(base)
        rows += new
    return rows, pareto_front(rows)


def leaderboard_frame(rows: list[dict], front: list[bool]):
    """The rows as a table (sizes in MiB, ratios, recoveries as %), with a Pareto column."""
    import pandas as pd

    from ..report.leaderboard import COLUMNS, format_cell

    data = [{title: format_cell(key, row.get(key)) for key, title in COLUMNS} | {"Pareto": "★" if on else ""}
            for row, on in zip(rows, front)]
    return pd.DataFrame(data, columns=[t for _, t in COLUMNS] + ["Pareto"])


def caption(rows: list[dict]) -> str:
    """How the figures were measured, from the rows' conditions (device, threads, dtype, backends)."""
    seen = []
    for row in rows:
        m = row.get("measured") or {}
        text = ", ".join(f"{k} {v}" for k, v in m.items())
        if text and text not in seen:
            seen.append(text)
    return ("Measured: " + "; ".join(seen) + ". Quality recovery: original / compressed for perplexity, "
            "compressed / original for accuracy.") if seen else ""


def pareto_plot(rows: list[dict], front: list[bool]):
    from ..report.leaderboard import pareto_figure

    return pareto_figure(rows, front, caption=caption(rows) or None)


def run_details(runs: list[RunInfo], name: str, runs_dir: Path | None = None) -> tuple[str, list[Any]]:
    """``(report.md without its image lines, [PIL images of its plots])`` of the run called ``name``.

    Only files inside the run's folder are read; with ``runs_dir``, its absolute path is written relative to it.
    """
    redact = Redactor(runs_dir) if runs_dir is not None else str
    run = next((r for r in runs if r.name == name), None)
    if run is None:
        return f"No run called `{name}` here.", []
    if run.report is None:
        return redact(f"**{name}** has no report yet: {run.error}"), []
    files = run.report.get("files") or {}
    notes: list[str] = []
    if not isinstance(files, dict):
        notes.append("report.json's `files` is not a mapping: its report.md and plots are looked for by name")
        files = {}
    md_path, why = run_file(run.path, files.get("markdown", "report.md"))
    if md_path is None:
        text = f"(report.md is not shown: {why}; report.json is shown in the table)"
    else:
        text = _read_markdown(md_path, notes)
    pics = _images(run, notes)
    text = _IMAGE_LINE.sub("", text) + "".join(f"\n\n*({note})*" for note in notes)
    return redact(text), [(img, redact(caption)) for img, caption in pics]


#: Columns of the flipped chat answers table (report.json's ``comparison.chat.flipped`` items).
FLIP_COLUMNS = (("index", "row"), ("kind", "kind"), ("prompt", "prompt"), ("answer", "expected"),
                ("original", "original's reply"), ("compressed", "compressed model's reply"))


def chat_flips(runs: list[RunInfo], name: str, runs_dir: Path | None = None) -> tuple[str, Any]:
    """``(one line of chat figures, a table of the flipped answers)`` of the run called ``name``; ``("", None)``
    when it has no chat answers (no evaluate stage with ``chat:``, or no compressed model)."""
    import pandas as pd

    redact = Redactor(runs_dir) if runs_dir is not None else str
    run = next((r for r in runs if r.name == name), None)
    try:  # a hand-edited report.json of the wrong shape shows no table, not an error
        cmp = (run.report.get("comparison") or {}).get("chat") if run and run.report else None
        models = run.report["models"] if cmp else {}
        orig, comp = models["original"]["chat"], models["compressed"]["chat"]
        n = orig["n_with_answer"]
        line = (f"**Chat answers**: correct {orig['correct']} → {comp['correct']} of {n}; **{cmp['flips']} flips** "
                f"(right before, wrong after), {cmp['gains']} gains; {cmp['exact_agreement']:.0%} of the replies "
                "identical to the original's.")
        items = [{title: redact(_cell(f, key)) for key, title in FLIP_COLUMNS} for f in cmp.get("flipped") or []]
    except (AttributeError, KeyError, TypeError, ValueError):
        return "", None
    return redact(line), pd.DataFrame(items, columns=[title for _, title in FLIP_COLUMNS])


def _cell(item: dict, key: str) -> str:
    value = item.get(key)
    if key == "index":
        return str(value + 1)  # the prompt's row in its file, from 1
    return "" if value is None else str(value)


def _read_markdown(path: Path, notes: list[str]) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_MARKDOWN_BYTES + 1)
    if len(data) > MAX_MARKDOWN_BYTES:
        notes.append(f"report.md is cut at {MAX_MARKDOWN_BYTES >> 20} MiB")
        data = data[:MAX_MARKDOWN_BYTES]
    return data.decode("utf-8", errors="replace")


def _images(run: RunInfo, notes: list[str]) -> list[Any]:
    from PIL import Image

    out = []
    files = run.report.get("files") or {}
    plots = files.get("plots", []) if isinstance(files, dict) else []
    for rel in plots if isinstance(plots, list) else [plots]:
        path, why = run_file(run.path, rel, suffixes=(".png",))
        if path is None:
            notes.append(f"a plot is not shown: {why}")
            continue
        try:
            with Image.open(path) as img:  # loaded here: gradio serves its own copy, never a path under runs/
                out.append((img.convert("RGB"), rel))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            notes.append(f"a plot is not shown: `{rel}` is not a readable PNG ({type(e).__name__})")
    return out


def _redacted(value: Any, redact: Redactor) -> Any:
    """``value`` with ``redact`` applied to every string in it (dicts and lists walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v, redact) for v in value)
    return value


def build_reports_tab(runs_dir: Path) -> dict[str, Any]:
    """The Reports tab (call inside a ``gr.Blocks``): leaderboard, Pareto scatter, one run's report."""
    import gradio as gr

    redact = Redactor(runs_dir)

    def load():
        runs = scan(runs_dir)
        rows, front = leaderboard(runs)
        rows = [_redacted(row, redact) for row in rows]  # report.json's strings (method, conditions) may hold paths
        names = [r.name for r in runs]
        note = f"{len(runs)} run folder(s) in the runs folder" + (
            "" if runs else ": none yet (run a recipe with `llmcompress run`, or start the app with --recipe)")
        return (note, leaderboard_frame(rows, front), pareto_plot(rows, front),
                gr.update(choices=names, value=names[0] if names else None))

    with gr.Row():
        found = gr.Markdown("")
        refresh = gr.Button("Refresh", scale=0, elem_id="llmc-refresh")
    table = gr.Dataframe(interactive=False, wrap=True, label="Runs (★ = on the Pareto front)")
    plot = gr.Plot(label="Size vs quality vs speed")
    pick = gr.Dropdown([], label="Report of one run", interactive=True)
    chat = gr.Markdown("")
    flips = gr.Dataframe(interactive=False, wrap=True, visible=False,
                         label="Chat answers that flipped (right before compression, wrong after)")
    report = gr.Markdown("")
    images = gr.Gallery(label="Plots", columns=2, height=420, object_fit="contain")

    def show(name):
        text, pics = run_details(scan(runs_dir), name or "", runs_dir)
        return text, pics

    def show_flips(name):
        line, frame = chat_flips(scan(runs_dir), name or "", runs_dir)
        return line, gr.update(value=frame, visible=frame is not None and len(frame) > 0)

    refresh.click(load, outputs=[found, table, plot, pick], api_name="reports")
    pick.change(show, inputs=[pick], outputs=[report, images], api_name="report")
    pick.change(show_flips, inputs=[pick], outputs=[chat, flips], api_name="report_chat")
    return {"load": load, "outputs": [found, table, plot, pick], "table": table, "plot": plot, "pick": pick}
