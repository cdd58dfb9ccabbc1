"""``plots/tradeoff.png``: original vs compressed bars for size, quality and speed, with the conditions as a caption;
``plots/lora-loss.png``: the lora stages' training loss per step.

matplotlib is imported inside the function, and through ``Figure`` + the Agg canvas rather than pyplot, so no global
backend state changes in the process that calls it (the app, a notebook).
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from . import metrics as M

ORIGINAL_COLOR, COMPRESSED_COLOR = "#9e9e9e", "#1f77b4"
_BETTER = {"lower": "lower is better", "higher": "higher is better"}


def tradeoff_panels(report: dict) -> list[dict]:
    """The panels that have data: ``{"title", "better", "change", "groups", "original", "compressed", "errors"}``."""
    cmp = report["comparison"]
    head = cmp["headline"]
    panels = []
    size = cmp["size"]
    if M.is_number(size.get("original_bytes")) and M.is_number(size.get("compressed_bytes")):
        panels.append(_panel("Size on disk (MiB)", "lower", size.get("change", ""), [""],
                             [size["original_bytes"] / 2**20], [size["compressed_bytes"] / 2**20]))
    for key in ("quality", "accuracy"):
        q = head.get(key)
        if q and not (key == "accuracy" and q == head.get("quality")):  # vision: one figure is both
            title = q["metric"] if q["task"] == q["metric"] else f"{q['task']}: {q['metric']}"
            errors = None
            if "stderr" in q:  # per-model stderrs from the model entries
                evals = [report["models"][r]["eval"].get(q["task"], {}) for r in ("original", "compressed")]
                name, sep, flt = q["metric"].partition(",")
                errors = [e.get(f"{name}_stderr{sep}{flt}") or 0 for e in evals]
            panels.append(_panel(title, q["better"], q["change"], [""], [q["original"]], [q["compressed"]], errors))
    figures = (cmp.get("bench") or {}).get("figures") or {}
    for speed_figure, title in (("decode_tok_s", "Decode tokens/s"), ("images_per_s", "Images/s")):
        decode = sorted((M.split_batch(f)[1] or 0, f) for f in figures if M.split_batch(f)[0] == speed_figure)
        if decode:
            entries = [figures[f] for _, f in decode]
            speed = head["speed"]
            change = speed["change"] + (f" at batch {speed['batch']}" if speed.get("batch") else "")
            panels.append(_panel(title, "higher", change, [f"batch {b}" if b else "" for b, _ in decode],
                                 [e["original"] for e in entries], [e["compressed"] for e in entries]))
            break
    return panels


def _panel(title, better, change, groups, original, compressed, errors=None) -> dict:
    return {"title": title, "better": better, "change": change, "groups": groups, "original": original,
            "compressed": compressed, "errors": errors}


def caption(report: dict) -> str:
    """Where each panel's numbers come from."""
    cmp = report["comparison"]
    parts = ["Size: weight files on disk (MiB = 2^20 bytes)."] if cmp["size"].get("shrink") else []
    if cmp.get("bench"):
        parts.append(f"Speed: {M.describe_conditions(cmp['bench']['measured_with'])}.")
    if cmp.get("eval"):
        parts.append(f"Quality: {M.describe_conditions(cmp['eval']['measured_with'])}.")
    note = report["models"]["original"]["meta"].get("note")
    if note:
        parts.append(f"Original: {note}.")
    return " ".join(parts)


def plot_tradeoff(report: dict, path: Path) -> Path | None:
    """Draw the tradeoff figure to ``path`` (atomically). Returns the path, or None when there is nothing to plot."""
    panels = tradeoff_panels(report)
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    width = max(7.0, 3.4 * n)
    text = textwrap.fill(caption(report), width=int(width * 15))
    title = textwrap.fill(report["headline"].split(" — ")[0], width=int(width * 8.5))  # room for the legend
    bottom_in = 0.3 + 0.15 * (text.count("\n") + 1)  # inches taken by the caption
    top_in = 0.1 + 0.2 * (title.count("\n") + 1)  # ... and by the title
    fig = Figure(figsize=(width, 3.9 + bottom_in + top_in), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    handles = [_draw(ax, panel, report["same_model"]) for ax, panel in zip(axes, panels)][0]
    fig.legend(handles, ["original", "compressed"], loc="upper right", ncol=2, frameon=False, fontsize=9)
    fig.suptitle(title, x=0.01, y=0.99, ha="left", va="top", fontsize=11, fontweight="bold")
    fig.text(0.01, 0.01, text, fontsize=7.5, va="bottom", ha="left", color="#444444")
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, bottom_in / height, 1, 1 - top_in / height))
    return save_png(fig, path)


def _draw(ax, panel: dict, same_model: bool) -> tuple:
    """One panel of grouped bars; returns the (original, compressed) bar containers for the legend."""
    k = len(panel["groups"])
    width = 0.38
    xs = range(k)
    bars_o = ax.bar([x - width / 2 for x in xs], panel["original"], width, color=ORIGINAL_COLOR,
                    yerr=[panel["errors"][0]] if panel["errors"] else None, capsize=4)
    bars_c = ax.bar([x + width / 2 for x in xs], panel["compressed"], width, color=COMPRESSED_COLOR,
                    yerr=[panel["errors"][1]] if panel["errors"] else None, capsize=4)
    for bars in (bars_o, bars_c):
        ax.bar_label(bars, labels=[M.fmt_number(round(b.get_height(), 3)) for b in bars], fontsize=8, padding=2)
    ax.set_xticks(list(xs), panel["groups"] if k > 1 else [""])
    if k == 1:
        ax.tick_params(axis="x", length=0)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.spines[["top", "right"]].set_visible(False)
    sub = _BETTER.get(panel["better"], "")
    change = "" if same_model else panel["change"]
    ax.set_title(f"{panel['title']}\n{sub}" + (f" · {change}" if change else ""), fontsize=9)
    ax.tick_params(labelsize=8)
    return bars_o, bars_c


_LOSS_NAMES = {"distill": "KL to the original (distill)", "sft": "next-token cross-entropy (sft)"}


def plot_loss(report: dict, path: Path) -> Path | None:
    """``plots/lora-loss.png``: each lora stage's training loss per optimizer step (``comparison.lora_loss``, the
    numbers its run logged), a resumed stage's restart marked. None when no lora stage ran."""
    curves = report["comparison"].get("lora_loss")
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for c in curves:
        name = _LOSS_NAMES.get(c["objective"], c["objective"] or "loss")
        ax.plot(c["steps"], c["loss"], marker="." if len(c["steps"]) <= 60 else None, lw=1.2,
                label=f"{c['stage']}: {name}")
        if c.get("resumed_from_step"):
            ax.axvline(c["resumed_from_step"], color="#999999", ls=":", lw=1)
            ax.annotate(f"resumed at step {c['resumed_from_step']}", (c["resumed_from_step"], 1), fontsize=7,
                        xycoords=("data", "axes fraction"), xytext=(3, -10), textcoords="offset points")
    ax.set_xlabel("optimizer step", fontsize=9)
    ax.set_ylabel("training loss", fontsize=9)
    ax.set_title("LoRA training loss (mean over each step's micro-batches and processes)", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str | Path, **savefig: Any) -> Path:
    """Write a Figure as PNG atomically (a temporary file beside it, synced, then renamed; removed if drawing fails).

    ``savefig``: more arguments for ``Figure.savefig`` (e.g. ``bbox_inches="tight"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", **savefig)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
