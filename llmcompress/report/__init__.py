"""Reports: report.json, report.md and plots for original vs compressed, plus the console summary.

::

    report = build_report(recipe=recipe, environment=env, stages=stages, original=orig, compressed=comp)
    paths = write_report(run_dir, report)   # {"json": Path, "markdown": Path, "plots": [Path, ...]}
    console.print(summary_table(report))

Light to import: matplotlib and rich load inside the functions that draw.
"""

from __future__ import annotations

from .build import build_report
from .io import load_report, write_report
from .markdown import render_markdown
from .plots import plot_loss, plot_tradeoff
from .table import summary_table

__all__ = ["build_report", "write_report", "load_report", "summary_table", "render_markdown", "plot_tradeoff",
           "plot_loss"]
