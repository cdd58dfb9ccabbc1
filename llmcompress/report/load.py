"""The report's load curves: what ``vllm bench serve`` measured at each request rate (benchmark ``load:``).

A Markdown table (one row per rate and model) and ``plots/load.png``: TTFT p50/p99 and goodput (request throughput
when no SLO was set) against the request rate, original vs compressed (and any compared model), one line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import metrics as M

_COLORS = {"original": "#9e9e9e", "compressed": "#1f77b4"}
_MORE = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _stage(report: dict) -> dict | None:
    found = [s for s in report.get("stages", []) if s.get("type") == "benchmark" and (s.get("data") or {}).get("load")]
    return found[-1]["data"] if found else None


def _load(report: dict) -> dict | None:
    data = _stage(report)
    return data["load"] if data else None


def _trio(point: dict, metric: str) -> str:
    values = [point.get(f"{metric}_p{p}_ms") for p in (50, 90, 99)]
    return "—" if values[0] is None else " / ".join(M.fmt_number(v) for v in values) + " ms"


def _rate(rate: Any) -> str:
    return "∞ (all at once)" if rate == "inf" else f"{rate:g}/s"


def load_markdown(report: dict, table: Any) -> str:
    """The section ("" when no benchmark stage ran ``load:``)."""
    load = _load(report)
    if not load:
        return ""
    s = load["settings"]
    slo = s.get("slo")
    header = ["request rate", "model", "req/s", "output tok/s", "TTFT p50 / p90 / p99", "TPOT p50 / p90 / p99",
              "ITL p50 / p90 / p99", "E2E p50 / p99", *(["goodput (req/s)"] if slo else []), "failed"]
    keys = list(load["curves"])
    rows = []
    for i, rate in enumerate(s["rates"]):
        for key in keys:
            p = load["curves"][key][i]
            e2e = "—" if p.get("e2el_p50_ms") is None else (
                f"{M.fmt_number(p['e2el_p50_ms'])} / {M.fmt_number(p['e2el_p99_ms'])} ms")
            rows.append([_rate(rate), key.split("/", 1)[1], M.fmt_number(p["request_throughput"]),
                         M.fmt_number(p["output_throughput"]), _trio(p, "ttft"), _trio(p, "tpot"), _trio(p, "itl"),
                         e2e, *([M.fmt_number(p.get("request_goodput"))] if slo else []), p.get("failed", 0)])
    unserved = ((_stage(report).get("backends") or {}).get("vllm") or {}).get("unsupported") or {}
    untimed = sorted({f"{_rate(rate)} ({key.split('/', 1)[1]})" for key in keys
                      for rate, p in zip(s["rates"], load["curves"][key]) if p.get("not_per_token")})
    limits = ", ".join(f"{k[:-3].upper()} ≤ {v:g} ms" for k, v in (slo or {}).items() if v is not None)
    runtime = ", ".join(str(s[k]) for k in ("device", "dtype") if s.get(k))
    return "\n".join([
        "## Load curves (vLLM)", "", table(header, rows), "",
        *[f"- **{role}** has no curve: vLLM does not serve it here ({why})" for role, why in unserved.items()],
        *([f"- TPOT and ITL at {', '.join(untimed)}: not measured (—): each request's whole output reached the "
           "client in one streamed chunk, so no time per token was seen"] if untimed else []),
        *([""] if unserved or untimed else []),
        f"*Measured with {s['tool']} against each model's vLLM server, one run per rate and model, rate by rate "
        f"(every model in turn): {s['num_prompts']} requests per run, random prompts of {s['input_len']} tokens, "
        f"exactly {s['output_len']} output tokens each (greedy, ignore_eos), {s['arrivals']} arrivals"
        + (f", at most {s['max_concurrency']} in flight" if s.get("max_concurrency") else "")
        + f", seed {s['seed']}. " + (f"Goodput: requests/s meeting {limits}. " if slo else "")
        + "TPOT = time per output token after the first; ITL = gap between streamed tokens; E2E = whole request."
        + (f" {runtime}." if runtime else "") + "*",
    ])


def plot_load(report: dict, path: Path) -> Path | None:
    """Draw ``plots/load.png`` (atomically); None when the report has no load curves."""
    load = _load(report)
    if not load:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from .plots import save_png

    s = load["settings"]
    rates = s["rates"]
    xs = list(range(len(rates)))
    labels = ["∞" if r == "inf" else f"{r:g}" for r in rates]
    good = bool(s.get("slo"))
    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_t, ax_g = fig.subplots(1, 2)
    for n, (key, points) in enumerate(load["curves"].items()):
        role = key.split("/", 1)[1]
        color = _COLORS.get(role, _MORE[n % len(_MORE)])
        ax_t.plot(xs, [p["ttft_p50_ms"] for p in points], "o-", color=color, label=f"{role} p50")
        ax_t.plot(xs, [p["ttft_p99_ms"] for p in points], "s--", color=color, label=f"{role} p99")
        ax_g.plot(xs, [p["request_goodput" if good else "request_throughput"] for p in points], "o-", color=color,
                  label=role)
    ax_t.set_yscale("log")  # queueing makes TTFT grow by orders of magnitude past the server's capacity
    ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_t.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))  # 2s, 5s
    ax_t.set_title("Time to first token (ms)\nlower is better", fontsize=9)
    slo = ", ".join(f"{k[:-3].upper()} ≤ {v:g} ms" for k, v in (s.get("slo") or {}).items() if v is not None)
    ax_g.set_title((f"Goodput (req/s meeting {slo})" if good else "Request throughput (req/s)")
                   + "\nhigher is better", fontsize=9)
    for ax in (ax_t, ax_g):
        ax.set_xticks(xs, labels)
        ax.set_xlabel("request rate (req/s; ∞ = all at once)", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    ax_g.set_ylim(bottom=0)
    fig.suptitle(f"Load curves: {s['tool']}, {s['num_prompts']} requests x {s['input_len']} in / {s['output_len']} "
                 "out tokens per rate", x=0.01, ha="left", fontsize=10, fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_png(fig, path)
