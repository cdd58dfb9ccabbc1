"""The report browser: every run folder's report (its report.md and plots), and all runs on one size vs quality vs
speed scatter with the Pareto front (``llmcompress.report.leaderboard``: the same rows and front sweeps use).

Visitors pick a run by name among those found under the runs directory; no path ever comes from the browser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LLMCompressError
from .pool import find_runs, run_names

_IMAGE_LINE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    report: dict | None
    error: str | None = None  # why it has no report (unfinished run, unreadable file)


def scan(runs_dir: Path) -> list[RunInfo]:
    """Every run folder under ``runs_dir`` with its report (or why it has none)."""
    from ..report import load_report

    out = []
    runs = find_runs(runs_dir)
    for path, name in zip(runs, run_names(runs, runs_dir)):  # the names the chat columns and --run use
        try:
            out.append(RunInfo(name, path, load_report(path)))
        except LLMCompressError as e:
            out.append(RunInfo(name, path, None, str(e)))
    return out


def leaderboard(runs: list[RunInfo]) -> tuple[list[dict], list[bool]]:
    """One row per distinct original and one per run, and which rows are on the Pareto front."""
    from ..report.leaderboard import original_row, pareto_front, run_row

    rows, originals = [], set()
    for run in runs:
        if run.report is None:
            continue
        base = ((run.report.get("models") or {}).get("original") or {}).get("path")
        if base not in originals:
            originals.add(base)
            row = original_row(run.report)
            row["name"] = "original" if len(originals) == 1 else f"original ({Path(str(base)).name})"
            rows.append(row)
        if not run.report.get("same_model"):
            rows.append({**run_row(run.report, run.path), "name": run.name})
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


def run_details(runs: list[RunInfo], name: str) -> tuple[str, list[Any]]:
    """``(report.md without its image lines, [PIL images of its plots])`` of the run called ``name``."""
    run = next((r for r in runs if r.name == name), None)
    if run is None:
        return f"No run called `{name}` here.", []
    if run.report is None:
        return f"**{name}** has no report yet: {run.error}", []
    md_path = run.path / (run.report.get("files") or {}).get("markdown", "report.md")
    text = md_path.read_text() if md_path.is_file() else "(report.md is missing; report.json is shown in the table)"
    return _IMAGE_LINE.sub("", text), _images(run)


def _images(run: RunInfo) -> list[Any]:
    from PIL import Image

    out = []
    for rel in (run.report.get("files") or {}).get("plots", []):
        path = (run.path / rel).resolve()
        if path.is_file() and path.is_relative_to(run.path.resolve()) and path.suffix == ".png":
            with Image.open(path) as img:  # loaded here: gradio serves its own copy, never a path under runs/
                out.append((img.convert("RGB"), rel))
    return out


def build_reports_tab(runs_dir: Path) -> dict[str, Any]:
    """The Reports tab (call inside a ``gr.Blocks``): leaderboard, Pareto scatter, one run's report."""
    import gradio as gr

    def load():
        runs = scan(runs_dir)
        rows, front = leaderboard(runs)
        names = [r.name for r in runs]
        note = f"{len(runs)} run folder(s) in `{runs_dir}`" + (
            "" if runs else ": none yet (run a recipe with `llmcompress run`, or start the app with --recipe)")
        return (note, leaderboard_frame(rows, front), pareto_plot(rows, front),
                gr.update(choices=names, value=names[0] if names else None))

    with gr.Row():
        found = gr.Markdown("")
        refresh = gr.Button("Refresh", scale=0, elem_id="llmc-refresh")
    table = gr.Dataframe(interactive=False, wrap=True, label="Runs (★ = on the Pareto front)")
    plot = gr.Plot(label="Size vs quality vs speed")
    pick = gr.Dropdown([], label="Report of one run", interactive=True)
    report = gr.Markdown("")
    images = gr.Gallery(label="Plots", columns=2, height=420, object_fit="contain")

    def show(name):
        text, pics = run_details(scan(runs_dir), name or "")
        return text, pics

    refresh.click(load, outputs=[found, table, plot, pick], api_name="reports")
    pick.change(show, inputs=[pick], outputs=[report, images], api_name="report")
    return {"load": load, "outputs": [found, table, plot, pick], "table": table, "plot": plot, "pick": pick}
