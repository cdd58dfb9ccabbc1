"""The sweep's leaderboard: rows (``report.leaderboard.run_row`` per finished run), CSV, Markdown and the Pareto plot.

Failed and skipped recipes get a row too, with the reason, so nothing a sweep tried goes missing.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..report import metrics as M
from ..report.leaderboard import COLUMNS, format_cell, original_row, pareto_figure, pareto_front, run_row, save_figure
from ..utils.io import atomic_write_text

LEADERBOARD_CSV, LEADERBOARD_MD, PARETO_PNG = "leaderboard.csv", "leaderboard.md", "pareto.png"
#: Row keys of the CSV, after the table's columns (the figures behind them, and how each recipe ran).
EXTRA_CSV = ("status", "pareto", "recommended", "quality_metric", "quality_original", "accuracy_metric",
             "accuracy_original", "speed_figure", "speed_original", "size_original_bytes", "seconds", "attempts",
             "host", "error_kind", "error", "overrides", "run_dir")
_DIRECTION = {"size_bytes": "lower", "kl_mean": "lower"}


def build_rows(outcomes: list[dict], sort_by: str = "quality_recovery") -> list[dict]:
    """One row per outcome (finished, resumed, failed, skipped), best first by ``sort_by``, the original on top.

    Finished rows carry ``pareto`` (on the size/quality/speed front, the original included).
    """
    finished = [o for o in outcomes if o.get("report")]
    rows = []
    if finished:
        ref = original_row(finished[0]["report"])
        rows.append({**ref, "status": "reference", "run_dir": None})
    for o in finished:
        rows.append({**run_row(o["report"], o.get("run_dir")), **_common(o)})
    front = pareto_front(rows)
    for row, on in zip(rows, front):
        row["pareto"] = on
    ranked = sorted(rows[1:], key=lambda r: _rank(r, sort_by))
    others = [{"name": o["name"], **_common(o)} for o in outcomes if not o.get("report")]
    return rows[:1] + ranked + sorted(others, key=lambda r: (r["status"] != "failed", r["name"]))


def _common(o: dict) -> dict:
    return {k: o.get(k) for k in ("status", "seconds", "attempts", "host", "error_kind", "error", "overrides",
                                  "source")} | {"run_dir": o.get("run_dir")}


def _rank(row: dict, key: str) -> tuple:
    v = row.get(key)
    if not M.is_number(v):
        return (1, 0.0, str(row.get("name")))
    return (0, v if _DIRECTION.get(key) == "lower" else -v, str(row.get("name")))


def same_original(rows: list[dict]) -> bool:
    """Whether every finished run compared against the same original figures (else the reference row is ambiguous)."""
    seen = {(r.get("size_original_bytes"), r.get("quality_original"), r.get("quality_metric"))
            for r in rows if r.get("status") in ("done", "resumed")}
    return len(seen) <= 1


# ---------------------------------------------------------------------------------------------------------------------
# Files


def write_csv(rows: list[dict], path: Path) -> Path:
    keys = [k for k, _ in COLUMNS] + [k for k in EXTRA_CSV if k not in dict(COLUMNS)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for row in rows:
        w.writerow([_csv_value(row.get(k)) for k in keys])
    atomic_write_text(path, buf.getvalue())
    return path


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_pareto(rows: list[dict], path: Path, caption: str) -> Path | None:
    measured = [r for r in rows if "pareto" in r]
    if not measured:
        return None
    fig = pareto_figure(measured, [r["pareto"] for r in measured], caption=caption,
                        title="Size vs quality vs speed (colour: speedup; ringed: Pareto front)")
    return save_figure(fig, path)


def render_markdown(summary: dict, rows: list[dict], recommendations: list[dict], plot: str | None) -> str:
    """``leaderboard.md``: the table, the recommendation, what failed or was skipped and why, how it was measured."""
    done = [r for r in rows if r.get("status") in ("done", "resumed")]
    lines = [f"# Sweep `{summary['name']}`: {summary['counts']['points']} recipes", ""]
    for rec in recommendations:
        lines.append(f"**Recommended — {rec['rule']}:** " + (f"**{rec['pick']}** ({rec['why']})" if rec["pick"]
                                                           else f"none ({rec['why']})"))
        lines.append("")
    lines += _facts(summary, rows)
    lines += ["", _table(rows), ""]
    lines.append("★ = on the Pareto front of size, quality recovery and speedup (no other run, the original "
                 "included, is at least as good on all three and better on one). Quality recovery: original / "
                 "compressed for lower-is-better metrics (perplexity), compressed / original otherwise.")
    if not same_original(rows):
        lines += ["", "Note: the runs did not all compare against the same original figures (different models or "
                  "evaluation settings): read recoveries and speedups within each run only."]
    if plot:
        lines += ["", f"![Pareto front]({plot})"]
    problems = [r for r in rows if r.get("status") in ("failed", "skipped")]
    if problems:
        lines += ["", "## Failed or skipped", ""]
        for r in problems:
            tries = f" after {r['attempts']} attempts" if (r.get("attempts") or 1) > 1 else ""
            kind = {"input": " (bad input: not retried)", "runtime": ""}.get(r.get("error_kind") or "", "")
            lines.append(f"- **{r['name']}** {r['status']}{tries}{kind}: {_one_line(r.get('error'))}")
        if any(r["status"] == "skipped" for r in problems):
            lines += ["", "Skipped: grid combinations that do not validate (say, bits a method does not support). "
                      "Fix: drop the value from the grid, or write the combinations you mean as `list` entries "
                      "(`on_invalid: fail` stops a sweep on them instead)."]
    lines += ["", "## Recipes", "", "| run | status | overrides of the base recipe | run folder | seconds |",
              "|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r.get("status") != "reference"), key=lambda r: str(r["name"])):
        over = " ".join(f"`{o}`" for o in r.get("overrides") or []) or "—"
        folder = f"`{r['run_dir']}`" if r.get("run_dir") else "—"
        seconds = format_cell("seconds", r.get("seconds"))
        lines.append(f"| {r['name']} | {r['status']} | {over} | {folder} | {seconds} |")
    if done and summary.get("base"):
        common = " ".join(f"--set {o}" for o in summary.get("set") or [])
        lines += ["", f"Re-run one alone: `llmcompress run {summary['base']} {common + ' ' if common else ''}"
                  "--set name=NAME --set KEY=VALUE ...` with its overrides above."]
    return "\n".join(lines) + "\n"


def _facts(summary: dict, rows: list[dict]) -> list[str]:
    c = summary["counts"]
    ex = summary["executor"]
    where = ex["type"] + (f" ({ex.get('address')})" if ex.get("type") == "ray" else "")
    lines = [f"- Base recipe: `{summary.get('base') or 'inline'}`; executor: {where}; "
             f"{c['done']} ran, {c['resumed']} finished earlier (skipped), {c['failed']} failed, "
             f"{c['skipped']} skipped as invalid; this command took {summary['seconds']:.0f} s (the recipes' own "
             f"run times, summed: {sum(r.get('seconds') or 0 for r in rows):.0f} s)."]
    cond = summary.get("measured") or {}
    if cond.get("eval"):
        lines.append(f"- Quality measured with: {M.describe_conditions(cond['eval'])}.")
    if cond.get("bench"):
        lines.append(f"- Speed measured with: {M.describe_conditions(cond['bench'])}.")
    base = summary.get("baseline") or {}
    if base.get("runs"):
        lines.append(f"- The original model's evaluation was computed {base['computed']} time(s) and reused from the "
                     f"cache by {base['reused']} of {base['runs']} runs (keyed by its weights, settings and library "
                     "versions). Speed is measured afresh in every run, original and compressed interleaved.")
    return lines


def _table(rows: list[dict]) -> str:
    cols = [(k, t) for k, t in COLUMNS if any(r.get(k) is not None for r in rows)] or list(COLUMNS[:1])
    metric = next((r.get("quality_metric") for r in rows if r.get("quality_metric")), None)
    speed = next((r.get("speed_figure") for r in rows if r.get("speed_figure")), None)
    titles = {"quality": f"quality ({metric})" if metric else "quality",
              "speed": f"speed ({M.bench_label(speed)})" if speed else "speed"}
    head = ["", *[titles.get(k, t) for k, t in cols], "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        star = "★" if r.get("pareto") else ""
        cells = [format_cell(k, r.get(k)) if k != "name" else f"**{r['name']}**" if r.get("recommended")
                 else str(r["name"]) for k, _ in cols]
        status = r.get("status") or ""
        if status in ("failed", "skipped"):
            status = f"{status}: {_one_line(r.get('error'), 80)}"
        out.append("| " + " | ".join([star, *cells, status]) + " |")
    return "\n".join(out)


def _one_line(text: Any, width: int = 300) -> str:
    s = " ".join(str(text or "").split()).replace("|", "\\|")
    return s if len(s) <= width else s[: width - 1] + "…"
