"""``plots/distill.png``: each distill stage's training loss per step and its held-out curve (perplexity and KL to
the teacher), as its run logged them (``result.json``: ``loss_curve``, ``held_out_curve``)."""

from __future__ import annotations

from pathlib import Path


def distill_curves(report: dict) -> list[dict]:
    """``[{"stage", "loss", "held_out"}]`` of the distill stages that kept a loss curve."""
    out = []
    for s in report.get("stages", []):
        data = s.get("data") or {}
        if s.get("type") == "distill" and data.get("loss_curve"):
            out.append({"stage": s.get("dir") or s.get("label"), "loss": data["loss_curve"],
                        "held_out": data.get("held_out_curve") or []})
    return out


def plot_distill(report: dict, path: Path) -> Path | None:
    """Left: the training loss per optimizer step; right: held-out KL to the teacher and perplexity per step.
    None when no distill stage ran."""
    curves = distill_curves(report)
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import save_png

    held = any(c["held_out"] for c in curves)
    fig = Figure(figsize=(11.0 if held else 7.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if held else 1)
    ax = axes[0] if held else axes
    for c in curves:
        steps = list(range(1, len(c["loss"]) + 1))
        ax.plot(steps, c["loss"], lw=1.2, marker="." if len(steps) <= 60 else None, label=c["stage"])
    ax.set(xlabel="optimizer step", ylabel="KL to the teacher (training loss)")
    ax.set_title("distill: training loss", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    if held:
        kl_ax = axes[1]
        ppl_ax = kl_ax.twinx()
        for c in curves:
            if not c["held_out"]:
                continue
            steps = [p["step"] for p in c["held_out"]]
            kl_ax.plot(steps, [p["kl"] for p in c["held_out"]], marker="o", lw=1.2, label=f"{c['stage']}: KL")
            ppl_ax.plot(steps, [p["perplexity"] for p in c["held_out"]], marker="s", ls="--", lw=1,
                        label=f"{c['stage']}: perplexity")
        kl_ax.set(xlabel="optimizer step", ylabel="held-out KL to the teacher")
        ppl_ax.set_ylabel("held-out perplexity")
        kl_ax.set_title("distill: held-out text", fontsize=10)
        lines = kl_ax.get_legend_handles_labels()
        more = ppl_ax.get_legend_handles_labels()
        kl_ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, frameon=False)
    for a in fig.axes:
        a.tick_params(labelsize=8)
    fig.tight_layout()
    return save_png(fig, path)
