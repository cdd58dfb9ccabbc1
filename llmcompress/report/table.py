"""The end-of-run console summary: one rich Table, original vs compressed, that fits on one screen."""

from __future__ import annotations

from typing import Any

from . import metrics as M

#: At most this many quality rows (the full list is in report.md).
MAX_QUALITY_ROWS = 8
_STYLE = {"better": "green", "worse": "red", "same": "dim", None: ""}


def summary_table(report: dict) -> Any:
    """A ``rich.table.Table``: figure | original | compressed | change; the caption says how it was measured."""
    from rich.table import Table

    title = report["headline"].split(" — ")[0]
    table = Table(title=title, caption=_caption(report), title_justify="left", caption_justify="left")
    table.add_column("figure", style="bold")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("change")
    cmp = report["comparison"]
    size = cmp["size"]
    table.add_row("size on disk", M.fmt_bytes(size["original_bytes"]), M.fmt_bytes(size["compressed_bytes"]),
                  _styled(size.get("change", "—"), _size_verdict(size)))
    sections = [_quality_rows(report), _kl_rows(cmp), _chat_rows(report), _bench_rows(cmp)]
    for rows in sections:
        if rows:
            table.add_section()
        for row in rows:
            table.add_row(*row)
    return table


def _quality_rows(report: dict) -> list[tuple]:
    metrics = (report["comparison"].get("eval") or {}).get("metrics") or {}
    rows = []
    for task, entries in metrics.items():
        for metric, e in entries.items():
            name = metric if task == metric else f"{task} {metric}"
            arrow = {"lower": " ↓", "higher": " ↑"}.get(e["better"], "")
            rows.append((name + arrow, M.fmt_number(e["original"]), M.fmt_number(e["compressed"]),
                         _styled(e["change"], e["verdict"])))
    return rows[:MAX_QUALITY_ROWS]


def _kl_rows(cmp: dict) -> list[tuple]:
    kl = cmp.get("kl") or {}
    rows = []
    for name, e in (kl.get("metrics") or {}).items():
        arrow = {"lower": " ↓", "higher": " ↑"}.get(e["better"], "")
        rows.append((name + arrow, "—", M.fmt_number(e["value"]), "vs original"))
    return rows


def _chat_rows(report: dict) -> list[tuple]:
    """Chat answers: correct counts of both models, then the flips (right before, wrong after)."""
    orig, comp = report["models"]["original"].get("chat"), report["models"]["compressed"].get("chat")
    if not orig or not orig.get("n_with_answer"):
        return []
    cmp = report["comparison"].get("chat")
    e = (cmp or {}).get("accuracy") or {}
    n = orig["n_with_answer"]
    rows = [("chat correct ↑", f"{orig['correct']}/{n}", f"{(comp or orig)['correct']}/{n}",
             _styled(e.get("change", "—"), e.get("verdict")))]
    if cmp is not None:
        agree = f", {cmp['exact_agreement']:.0%} identical" if M.is_number(cmp.get("exact_agreement")) else ""
        rows.append(("chat flips ↓", "—", str(cmp["flips"]),
                     _styled(f"{cmp['gains']} gains{agree}", "worse" if cmp["flips"] > cmp["gains"] else None)))
    return rows


def _bench_rows(cmp: dict) -> list[tuple]:
    figures = (cmp.get("bench") or {}).get("figures") or {}
    return [(M.bench_label(fig), M.fmt_value(fig, e["original"]), M.fmt_value(fig, e["compressed"]),
             _styled(e["change"], e["verdict"] if not e["change"].startswith("about") else "same"))
            for fig, e in figures.items() if fig != "size_bytes"]


def _size_verdict(size: dict) -> str | None:
    shrink = size.get("shrink")
    if shrink is None or size.get("change") == "same size":
        return "same" if shrink is not None else None
    return "better" if shrink > 1 else "worse"


def _styled(text: str, verdict: str | None) -> str:
    style = _STYLE.get(verdict, "")
    return f"[{style}]{_escape(text)}[/]" if style else _escape(text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(str(text))


def _caption(report: dict) -> str:
    cmp = report["comparison"]
    lines = []
    if cmp.get("eval"):
        lines.append(f"quality: {M.describe_conditions(cmp['eval']['measured_with'])}")
    if cmp.get("bench"):
        lines.append(f"speed: {M.describe_conditions(cmp['bench']['measured_with'])}")
    if report.get("same_model"):
        lines.append("no stage changed the model: compressed = original")
    return _escape("\n".join(lines) or M.conditions_text(report["environment"]))
