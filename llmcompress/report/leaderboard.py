"""Many runs side by side: one flat row per run (read from its report.json), the Pareto front, and its plot.

Used by sweep leaderboards and by the app's report browser::

    rows = [run_row(load_report(d)) for d in run_dirs]
    front = pareto_front(rows)                       # [True, False, ...] aligned with rows
    fig = pareto_figure(rows, front)                 # size vs quality, speed as colour, the frontier drawn

A row's figures come from the report's own headline (``comparison.headline``), so every run is judged by the same
rules the single-run report uses. ``quality_recovery`` puts perplexity and accuracy on one "higher is better" scale:
original / compressed for a lower-is-better metric (perplexity), compressed / original for a higher-is-better one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from . import metrics as M

#: Default Pareto objectives: smaller on disk, closer to the original's quality, faster.
OBJECTIVES: tuple[tuple[str, str], ...] = (
    ("size_bytes", "lower"), ("quality_recovery", "higher"), ("speedup", "higher"),
)

#: Stage types that make the compressed model (a row's ``kind``).
COMPRESSING = ("quantize", "prune")

#: Row keys in the order a table shows them, with their column titles.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "run"), ("method", "method"), ("size_bytes", "size"), ("size_shrink", "smaller by"),
    ("quality", "quality"), ("quality_recovery", "quality recovery"), ("kl_mean", "KL vs original"),
    ("top1_agreement", "top-1 agreement"), ("accuracy", "accuracy"), ("accuracy_recovery", "accuracy recovery"),
    ("speed", "speed"), ("speedup", "speedup"),
)


def recovery(better: str | None, original: Any, compressed: Any) -> float | None:
    """Share of the original's quality kept (1.0 = no loss; > 1 = better than the original)."""
    if not (M.is_number(original) and M.is_number(compressed)) or better not in ("lower", "higher"):
        return None
    if better == "lower":
        return original / compressed if compressed else None
    return compressed / original if original else None


def run_row(report: dict, run_dir: str | Path | None = None) -> dict[str, Any]:
    """The leaderboard row of one run: size, quality, KL, accuracy and speed of its compressed model, with the
    original's figures beside them (``*_original``) and the conditions the numbers were measured under."""
    cmp = report.get("comparison") or {}
    head = cmp.get("headline") or {}
    size = cmp.get("size") or {}
    kl = ((cmp.get("kl") or {}).get("metrics") or {})
    row: dict[str, Any] = {
        "name": report.get("name"), "method": report.get("method"), "run_dir": str(run_dir) if run_dir else None,
        "same_model": bool(report.get("same_model")),
        "size_bytes": size.get("compressed_bytes"), "size_original_bytes": size.get("original_bytes"),
        "size_shrink": size.get("shrink"), "size_change": size.get("change"),
        "kl_mean": (kl.get("kl_mean") or {}).get("value"),
        "top1_agreement": (kl.get("top1_agreement") or {}).get("value"),
        **_compression(report.get("stages") or []),
    }
    for key in ("quality", "accuracy"):
        entry = head.get(key) or {}
        row[f"{key}_metric"] = _metric_name(entry) if entry else None
        row[key], row[f"{key}_original"] = entry.get("compressed"), entry.get("original")
        row[f"{key}_better"], row[f"{key}_change"] = entry.get("better"), entry.get("change")
        row[f"{key}_stderr"], row[f"{key}_within_noise"] = entry.get("stderr"), entry.get("within_noise")
        row[f"{key}_recovery"] = recovery(entry.get("better"), entry.get("original"), entry.get("compressed"))
    speed = head.get("speed") or {}
    row.update(speed_figure=speed.get("figure"), speed=speed.get("compressed"), speed_original=speed.get("original"),
               speedup=speed.get("speedup"), speed_change=speed.get("change"))
    env = report.get("environment") or {}
    bench = (cmp.get("bench") or {}).get("measured_with") or {}
    row["measured"] = {k: env.get(k) for k in ("device", "threads", "dtype") if env.get(k) is not None}
    if bench.get("backends"):
        row["measured"]["backends"] = bench["backends"]
    return row


def _compression(stages: list[dict]) -> dict[str, Any]:
    """The run's compressing stage (its last quantize or prune): kind, method, nominal bits per weight, the form of
    the compressed weights (``g64, asym``, ``2:4``), its time; and every stage's time and the original's cache use."""
    found = [s for s in stages if s.get("type") in COMPRESSING]
    s = found[-1] if found else {}
    kind, data, cfg = s.get("type"), s.get("data") or {}, s.get("config") or {}
    evaluate = next((x for x in stages if x.get("type") == "evaluate"), {})
    return {"kind": kind, "compress_method": data.get("method") or cfg.get("method"),
            "bits": 16.0 if kind == "prune" else data.get("bits"), "form": weight_form(kind, cfg) if kind else None,
            "compress_seconds": data.get(f"{kind}_seconds"),
            "stage_seconds": {x.get("type"): x.get("seconds") for x in stages},
            "original_cached": ((evaluate.get("data") or {}).get("timing") or {}).get("original", {}).get("cached")}


def weight_form(kind: str | None, cfg: dict) -> str:
    """How a compressing stage's config stores weights: ``g64, asym`` (group, zero point), ``50% zeros``, ``2:4``."""
    if kind == "prune":
        return cfg.get("pattern") or (f"{cfg['sparsity']:.0%} zeros" if cfg.get("sparsity") else "pruned")
    sym = cfg.get("symmetric", cfg.get("sym"))
    parts = [f"g{cfg['group_size']}" if cfg.get("group_size") else "", "" if sym is None else "sym" if sym else "asym"]
    return ", ".join(p for p in parts if p)


def original_row(report: dict) -> dict[str, Any]:
    """A row for the original model of a run (recovery 1.0, speedup 1.0): the reference point of a scatter."""
    row = run_row(report)
    row.update(name="original", method="original", same_model=True, size_bytes=row["size_original_bytes"],
               size_shrink=1.0, kl_mean=0.0, top1_agreement=1.0, speed=row["speed_original"],
               speedup=1.0 if row["speed_original"] is not None else None, speed_change="reference", kind=None,
               compress_method=None, bits=None, form=None, compress_seconds=None, size_change=None)
    for key in ("quality", "accuracy"):
        row[key] = row[f"{key}_original"]
        row[f"{key}_recovery"] = 1.0 if row[key] is not None else None
        row[f"{key}_change"] = "reference" if row[key] is not None else None
    return row


def _metric_name(entry: dict) -> str:
    task, metric = entry.get("task"), M.base_name(str(entry.get("metric")))
    return metric if task in (None, metric) else f"{task}:{metric}"


def _value(row: dict, key: str, better: str) -> float | None:
    v = row.get(key)
    if not M.is_number(v):
        return None
    return -float(v) if better == "lower" else float(v)  # larger = better from here on


def dominates(a: dict, b: dict, objectives: Iterable[tuple[str, str]] = OBJECTIVES) -> bool:
    """``a`` is at least as good as ``b`` on every objective both rows measured, and better on one."""
    strictly = False
    shared = 0
    for key, better in objectives:
        va, vb = _value(a, key, better), _value(b, key, better)
        if va is None or vb is None:
            continue
        shared += 1
        if va < vb:
            return False
        strictly = strictly or va > vb
    return shared > 0 and strictly


def pareto_front(rows: list[dict], objectives: Iterable[tuple[str, str]] = OBJECTIVES) -> list[bool]:
    """For each row, True when no other row dominates it. Objectives a row lacks are compared on what it has;
    a row that measured none of them is never on the front."""
    objectives = tuple(objectives)
    measured = [any(_value(r, k, b) is not None for k, b in objectives) for r in rows]
    return [ok and not any(dominates(other, row, objectives) for j, other in enumerate(rows) if j != i)
            for i, (row, ok) in enumerate(zip(rows, measured))]


def pareto_figure(rows: list[dict], front: list[bool] | None = None, x: str = "size_bytes",
                  y: str = "quality_recovery", color: str = "speedup", title: str = "Size vs quality vs speed",
                  caption: str | None = None):
    """A matplotlib Figure: one point per row (``x`` against ``y``, coloured by ``color``), the frontier joined and
    ringed, every point labelled. Uses ``Figure`` + Agg, never pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    front = pareto_front(rows) if front is None else front
    points = [(r, f) for r, f in zip(rows, front) if M.is_number(r.get(x)) and M.is_number(r.get(y))]
    fig = Figure(figsize=(8, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scale = 2**20 if x.endswith("_bytes") else 1
    xs = [r[x] / scale for r, _ in points]
    ys = [r[y] for r, _ in points]
    cs = [r.get(color) if M.is_number(r.get(color)) else float("nan") for r, _ in points]
    if points:
        sc = ax.scatter(xs, ys, c=cs, cmap="viridis", s=60, edgecolors="black", linewidths=0.5, zorder=3)
        if any(c == c for c in cs):  # at least one measured colour value (nan != nan)
            fig.colorbar(sc, ax=ax, label=_label(color))
        on = sorted((xv, yv) for (r, f), xv, yv in zip(points, xs, ys) if f)
        if on:
            ax.plot([p[0] for p in on], [p[1] for p in on], color="crimson", lw=1.2, zorder=2, label="Pareto front")
            ax.scatter([p[0] for p in on], [p[1] for p in on], s=160, facecolors="none", edgecolors="crimson",
                       lw=1.5, zorder=4)
            ax.legend(loc="lower right")
        names = [str(r.get("name")) for r, _ in points]
        for (r, _), xv, yv, offset in zip(points, xs, ys, _label_offsets(ax, xs, ys, names)):
            ax.annotate(str(r.get("name")), (xv, yv), textcoords="offset points", xytext=offset, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run measured both figures", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(_label(x) + (" (MiB)" if scale != 1 else ""))
    ax.set_ylabel(_label(y))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
        fig.subplots_adjust(bottom=0.18)
    return fig


def _label_offsets(ax, xs: list[float], ys: list[float], names: list[str]) -> list[tuple[int, int]]:
    """Label offsets (points) such that no label box covers an earlier one: close runs stay readable."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72  # display pixels per point
    slots = [(5, 5), (5, -11), (-8, 12), (-8, -18), (5, 19), (5, -25), (-8, 26), (-8, -32)]
    boxes: list[tuple[float, float, float, float]] = []
    out = []
    for (x, y), name in zip(ax.transData.transform(list(zip(xs, ys))), names):
        w, h = 4.3 * len(name) * scale, 8 * scale  # ~ the width of a 7-point label
        for dx, dy in slots:
            x0 = x + dx * scale - (w if dx < 0 else 0)
            box = (x0, y + dy * scale, x0 + w, y + dy * scale + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        out.append((dx, dy) if dx > 0 else (dx - int(w / scale), dy))
    return out


def save_figure(fig, path: str | Path) -> Path:
    """Write a Figure as PNG atomically, cropped to what is drawn (``plots.save_png``: no file left if it fails)."""
    from .plots import save_png

    return save_png(fig, path, bbox_inches="tight")


def _label(key: str) -> str:
    return dict(COLUMNS).get(key, key.replace("_", " "))


def format_cell(key: str, value: Any) -> str:
    """A row value as a table shows it (sizes in MiB, ratios as 1.23x, recoveries as %)."""
    if value is None:
        return "—"
    if key.endswith("_bytes"):
        return M.fmt_bytes(value)
    if key in ("size_shrink", "speedup") and M.is_number(value):
        return M.fmt_ratio(value)
    if key.endswith("_recovery") or key == "top1_agreement":
        return f"{value:.1%}" if M.is_number(value) else str(value)
    return M.fmt_number(value)
