"""The report's serving section: every (backend, model) pair a benchmark stage timed, side by side.

Shown when a benchmark stage ran more than one backend or compared more than two models. Throughput is offline
(B requests sent together, output tokens / wall time); latency percentiles come from the largest batch size.
"""

from __future__ import annotations

from typing import Any

from . import metrics as M


def _last_benchmark(report: dict) -> dict | None:
    found = [s for s in report["stages"] if s["type"] == "benchmark"]
    return found[-1]["data"] if found else None


def serving_markdown(report: dict, table: Any) -> str:
    """Markdown for the section ("" when there is nothing beyond the original-vs-compressed tables)."""
    data = _last_benchmark(report)
    if not data or "backends" not in data:
        return ""
    backends: dict = data["backends"]
    roles = {r for res in backends.values() for r in res["figures"]} | {
        r for res in backends.values() for r in res["unsupported"]}
    if len(backends) < 2 and len(roles) < 3:
        return ""
    settings = data["settings"]
    sizes, big = settings["batch_sizes"], settings["batch_sizes"][-1]
    first = settings["backends"][0]
    header = ["backend", "model", *[f"output tok/s bs{b}" for b in sizes], f"TTFT p50 / p95 (bs{big})",
              f"ITL p50 / p95 (bs{big})", "load", "peak RSS", f"vs original, same backend (bs{big})",
              f"vs {first} original (bs{big})"]
    rows = []
    key = f"output_tok_s_bs{big}"
    for name, res in backends.items():
        for role, f in res["figures"].items():
            same = res["ratios"].get(role, {}).get(key)
            cross = (data.get("cross") or {}).get(f"{name}/{role} vs {first}/original", {}).get(key)
            if name == first and role == "original":
                same, cross = 1.0, 1.0
            elif name == first:
                cross = same
            rows.append([
                name, role, *[M.fmt_number(f.get(f"output_tok_s_bs{b}")) for b in sizes],
                _pair(f, f"ttft_p50_ms_bs{big}", f"ttft_p95_ms_bs{big}", "ms"),
                _pair(f, f"itl_p50_ms_bs{big}", f"itl_p95_ms_bs{big}", "ms"),
                M.fmt_value("load_s", f.get("load_s")), M.fmt_bytes(f.get("peak_rss_bytes")),
                _x(same), _x(cross),
            ])
        for role in res["unsupported"]:
            rows.append([name, role, *["not served"] * len(sizes), "—", "—", "—", "—", "—", "—"])
    lines = ["## Serving: every backend and model", "", table(header, rows), ""]
    for name, res in backends.items():
        for role, why in res["unsupported"].items():
            lines.append(f"- **{name} / {role}** not served here: {why}")
    lines.append("")
    for name, res in backends.items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v}" for k, v in res.get("engine", {}).items()))
    lines += ["", f"*Measured with: prompt {settings['prompt_tokens']} tokens, {settings['new_tokens']} new tokens "
              f"(greedy, forced), batch sizes {', '.join(map(str, sizes))} sent as concurrent requests, "
              f"{settings['repeats']} rounds (medians), every backend and model interleaved call by call; ratios are "
              f"medians of per-round pairs. {settings['device']}, {settings['dtype']}, {settings['threads']} "
              "thread(s). Load = start to ready (vLLM: process start to /health, import included); peak RSS = hf: "
              "fresh process, vLLM: server process tree.*"]
    return "\n".join(lines)


def _pair(f: dict, a: str, b: str, unit: str) -> str:
    if a not in f:
        return "—"
    return f"{f[a]:.1f} / {f[b]:.1f} {unit}"


def _x(r: float | None) -> str:
    return "—" if r is None else M.fmt_ratio(r)
