"""Write a report into a run folder (atomically, file by file) and read it back."""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMCompressError
from ..utils.io import atomic_write_json, atomic_write_text, read_json
from .build import FORMAT
from .markdown import render_markdown

REPORT_JSON, REPORT_MD, PLOTS_DIR = "report.json", "report.md", "plots"


def write_report(run_dir: Path, report: dict, plots: bool = True) -> dict:
    """Write ``plots/*.png``, ``report.md`` and, last, ``report.json`` (its presence means the report is complete).

    Returns:
        ``{"json": Path, "markdown": Path, "plots": [Path, ...]}``.
    """
    from .load import plot_load
    from .plots import plot_loss, plot_tradeoff

    run_dir = Path(run_dir)
    written = []
    if plots:
        for plot, name in ((plot_tradeoff, "tradeoff.png"), (plot_loss, "lora-loss.png")):
            path = plot(report, run_dir / PLOTS_DIR / name)
            if path is not None:
                written.append(path)
        path = plot_load(report, run_dir / PLOTS_DIR / "load.png")  # benchmark `load:` curves, if any
        if path is not None:
            written.append(path)
        from .distill import plot_distill

        path = plot_distill(report, run_dir / PLOTS_DIR / "distill.png")  # distill stages' loss + held-out curves
        if path is not None:
            written.append(path)
    rel = [p.relative_to(run_dir).as_posix() for p in written]
    atomic_write_text(run_dir / REPORT_MD, render_markdown(report, rel))
    atomic_write_json(run_dir / REPORT_JSON, {**report, "files": {"markdown": REPORT_MD, "plots": rel}})
    return {"json": run_dir / REPORT_JSON, "markdown": run_dir / REPORT_MD, "plots": written}


def load_report(run_dir: Path) -> dict:
    """Read ``report.json`` from a run folder (or the file itself). Raises LLMCompressError naming the fix."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise LLMCompressError(
            f"{path}: no report here. Fix: point at a finished run folder (runs/<name>), or re-run its recipe "
            "with `llmcompress run <recipe>` (finished stages are reused)."
        )
    try:
        report = read_json(path)
    except ValueError as e:
        raise LLMCompressError(f"{path}: not valid JSON ({e}). Fix: re-run the recipe to rewrite the report.") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise LLMCompressError(f"{path}: not an llmcompress report (no `\"format\": \"{FORMAT}\"`).")
    return report
