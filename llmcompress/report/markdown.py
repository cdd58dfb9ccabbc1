"""``report.md``: the human report. Every table is followed by the conditions it was measured under."""

from __future__ import annotations

import json
from typing import Any

from . import metrics as M
from .load import load_markdown
from .lora import merges_markdown, recovery_markdown
from .serving import serving_markdown

_BETTER = {"lower": "lower is better", "higher": "higher is better", None: ""}


def render_markdown(report: dict, plots: list[str] | None = None) -> str:
    """The whole report as Markdown; ``plots`` are paths relative to the run folder (embedded as images)."""
    sections = [
        _title(report),
        _stages(report),
        _size(report),
        _quality(report),
        _kl(report),
        _chat(report),
        recovery_markdown(report),
        merges_markdown(report),
        _bench(report, "speed", "Speed"),
        _bench(report, "memory", "Memory"),
        serving_markdown(report, _table),
        load_markdown(report, _table),
        _plots(plots or []),
        _notes(report),
        _environment(report),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def _title(report: dict) -> str:
    orig, comp = report["models"]["original"], report["models"]["compressed"]
    lines = [f"# {report['name']}: original vs compressed", "", f"**{report['headline']}**", ""]
    lines.append(f"- Original: {_model_line(orig)}")
    if report["same_model"]:
        lines.append("- Compressed: the same model (no stage changed it)")
    else:
        method = report.get("method")
        by = f" (made by {method})" if method and method != comp.get("description") else ""
        lines.append(f"- Compressed{by}: {_model_line(comp)}")
    env = report["environment"]
    when = [f"started {env['started']}" if env.get("started") else "",
            f"{env['seconds']:.1f} s in all" if M.is_number(env.get("seconds")) else "",
            f"finished {env['finished']}" if env.get("finished") else ""]
    if any(when):
        lines.append(f"- Run: {', '.join(w for w in when if w)}")
    return "\n".join(lines)


def _model_line(model: dict) -> str:
    desc = model.get("description") or model.get("path") or "?"
    path = f" (`{model['path']}`)" if model.get("path") and model.get("path") != desc else ""
    return f"{desc}{path}, {M.fmt_bytes(model.get('size_bytes'))} on disk"


def _stages(report: dict) -> str:
    rows = []
    for s in report["stages"]:
        settings = _kv({k: v for k, v in s["config"].items() if k not in ("type", "name") and v is not None})
        time = f"{s['seconds']:.1f} s" if M.is_number(s.get("seconds")) else "—"
        if s["resumed"]:
            time += " (resumed)"
        summary = _kv(s["summary"]) or "—"
        memory = M.fmt_bytes(s.get("peak_rss_bytes")) if s.get("peak_rss_bytes") and not s["resumed"] else "—"
        if s.get("peak_gpu_bytes"):
            memory += f" (GPU {M.fmt_bytes(s['peak_gpu_bytes'])})"
        rows.append([str(s["index"] + 1), s["label"], s["type"], settings or "defaults", summary, time, memory])
    note = ("*Peak memory: the highest resident memory of the run's process during the stage (servers and probes it "
            "started are not counted).*")
    return ("## What was done\n\n" + _table(["#", "stage", "type", "settings", "result", "time", "peak memory"], rows)
            + "\n\n" + note)


def _size(report: dict) -> str:
    size = report["comparison"]["size"]
    rows = [["size on disk", M.fmt_bytes(size["original_bytes"]), M.fmt_bytes(size["compressed_bytes"]),
             size.get("change", "—")]]
    bench = report["comparison"].get("bench") or {}
    entry = (bench.get("figures") or {}).get("param_bytes")
    if entry:
        orig, comp = M.fmt_bytes(entry["original"]), M.fmt_bytes(entry["compressed"])
        rows.append(["weights in memory", orig, comp, entry["change"]])
    note = "Size on disk: the weight files of each model folder (lower is better)."
    if entry:
        conditions = M.describe_conditions(bench["measured_with"])
        note += f" Weights in memory: parameters and buffers once loaded ({conditions})."
    return "## Size\n\n" + _table(["", "original", "compressed", "change"], rows) + f"\n\n*{note}*"


def _quality(report: dict) -> str:
    cmp = report["comparison"].get("eval")
    if cmp is None:
        return "## Quality\n\nNot measured (no evaluate stage)."
    orig, comp = report["models"]["original"]["eval"], report["models"]["compressed"]["eval"]
    rows, details = [], []
    for task in list(orig) + [t for t in comp if t not in orig]:
        o, c = orig.get(task) or {}, comp.get(task) or {}
        for metric in list(o) + [m for m in c if m not in o]:
            value = o.get(metric, c.get(metric))
            if not M.is_score(metric, value):
                if not metric.split(",")[0].endswith("_stderr") and value is not None:
                    details.append(f"{task} {metric}={value}")
                continue
            entry = cmp["metrics"].get(task, {}).get(metric, {})
            rows.append([task, metric, _BETTER[M.direction(metric)], _with_se(o, metric), _with_se(c, metric),
                         entry.get("change", "—")])
    if not rows and report["models"]["original"].get("chat"):  # a chat-only evaluate stage: its own section below
        return "## Quality"
    text = "## Quality\n\n" + _table(["task", "metric", "direction", "original", "compressed", "change"], rows)
    cond = M.describe_conditions(cmp["measured_with"]) + (f"; {', '.join(dict.fromkeys(details))}" if details else "")
    return text + f"\n\n*Measured with: {cond}. Perplexity change is relative (%); accuracy change in points.*"


def _with_se(metrics: dict, metric: str) -> str:
    value = metrics.get(metric)
    if not M.is_number(value):
        return "—"
    name, sep, flt = metric.partition(",")
    se = metrics.get(f"{name}_stderr{sep}{flt}")
    return f"{M.fmt_number(value)} ± {M.fmt_number(se)}" if M.is_number(se) else M.fmt_number(value)


def _kl(report: dict) -> str:
    kl = report["comparison"].get("kl")
    if not kl:
        return ""
    rows = [[name, _BETTER[e["better"]], M.fmt_number(e["value"])] for name, e in kl["metrics"].items()]
    tokens = report["models"]["compressed"]["kl"].get("tokens")
    over = f" over {tokens:,} tokens" if M.is_number(tokens) else ""
    what = ("next-token distributions", "positions", "token")
    per = report["models"]["compressed"]["kl"].get("per")  # vision: "image" or "detection query"
    if per:
        n = report["models"]["compressed"]["kl"].get("samples")
        over, what = (f" over {n:,} {per}s" if M.is_number(n) else ""), ("class distributions", f"{per}s", "class")
    return ("### Divergence from the original\n\n"
            + _table(["figure", "direction", "compressed vs original"], rows)
            + f"\n\n*KL(original ‖ compressed) of {what[0]}{over}; top-1 agreement = share of {what[1]} "
              f"where both models pick the same {what[2]}. "
              f"Measured with: {M.describe_conditions(kl['measured_with'])}.*")


#: Flipped chat answers listed in report.md (all of them, up to the stage's own cap, are in report.json).
MAX_FLIPS_LISTED = 10


def _chat(report: dict) -> str:
    """Chat answers: correct counts per model (and per kind), flips, gains, identical replies, the flipped items."""
    orig, comp = report["models"]["original"].get("chat"), report["models"]["compressed"].get("chat")
    if not orig:
        return ""
    comp = comp or orig
    cmp = report["comparison"].get("chat")
    change = (cmp or {}).get("accuracy") or {}
    rows = [["correct", _of(orig), _of(comp), change.get("change", "—")]]
    for kind, o in (orig.get("by_kind") or {}).items():
        c = (comp.get("by_kind") or {}).get(kind) or {}
        a, b = o.get("accuracy"), c.get("accuracy")
        rows.append([f"… {kind}", _of(o), _of(c), f"{(b - a) * 100:+.1f} pts" if M.is_number(a) and M.is_number(b)
                     and cmp is not None else "—"])
    text = "### Chat answers\n\n" + _table(["", "original", "compressed", "change"], rows)
    measured = report["models"]["original"]["measured_with"].get("eval") or {}
    settings = measured.get("chat") or {}
    how = (f"Both models answer {orig['n']} prompts (`{settings.get('prompts', '?')}`) with their chat template, "
           f"greedy, at most {settings.get('max_new_tokens', '?')} new tokens; a reply is correct when it contains "
           "the expected answer (case-insensitive, as a whole word or number).")
    runtime = M.conditions_text({k: v for k, v in measured.items() if k != "backend"})  # chat never uses vllm
    how += f" Measured on {runtime}." if runtime else ""
    if measured.get("dtype") in ("bfloat16", "float16") and (settings.get("batch_size") or 1) > 1:
        how += (f" In {M.short_dtype(measured['dtype'])}, a reply can depend on which prompts share its batch (left "
                "padding changes the rounding), so a few flips may be that alone; both models ran in the same "
                "batches (`batch_size: 1` or float32 removes the effect).")
    if cmp is None:
        return text + f"\n\n*{how}*"
    lines = [f"**{_n(cmp['flips'], 'flip')}** (right before, wrong after), {_n(cmp['gains'], 'gain')} (wrong before, "
             "right after)."]
    if M.is_number(cmp.get("exact_agreement")):
        lines.append(f"{cmp['exact_agreement']:.0%} of the replies are identical to the original's "
                     f"({cmp['identical']} of {orig['n']}).")
    if M.is_number(cmp.get("mean_first_divergence")):
        lines.append(f"The {cmp['diverged']} replies that differ first diverge at generated token "
                     f"{cmp['mean_first_divergence']:.1f} on average (0 = the first; identical replies not counted).")
    text += "\n\n" + " ".join(lines) + f"\n\n*{how}*"
    return text + _flips(cmp)


def _flips(cmp: dict) -> str:
    items = cmp.get("flipped") or []
    if not items:
        return ""
    rows = [[str(f["index"] + 1), _cut(f["prompt"]), _cut(f.get("answer") or ""), _cut(f["original"]),
             _cut(f["compressed"])] for f in items[:MAX_FLIPS_LISTED]]
    more = cmp["flips"] - len(rows)
    tail = f"\n\n*… and {more} more in report.json (`comparison.chat.flipped`).*" if more > 0 else ""
    return ("\n\n#### Flipped answers (right before, wrong after)\n\n"
            + _table(["row", "prompt", "expected", "original's reply", "compressed model's reply"], rows) + tail)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _of(figures: dict) -> str:
    """"171 of 300 (57.0%)"."""
    if not figures.get("n_with_answer"):
        return "—"
    return f"{figures['correct']} of {figures['n_with_answer']} ({figures['accuracy']:.1%})"


def _cut(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bench(report: dict, group: str, title: str) -> str:
    bench = report["comparison"].get("bench")
    if bench is None:
        return f"## {title}\n\nNot measured (no benchmark stage)." if group == "speed" else ""
    rows = []
    for fig, e in bench["figures"].items():
        if M.bench_group(fig) != group or fig == "param_bytes":  # param_bytes sits in the Size table
            continue
        rows.append([M.bench_label(fig), _BETTER[e["better"]], M.fmt_value(fig, e["original"]),
                     M.fmt_value(fig, e["compressed"]), e["change"]])
    if not rows:
        return ""
    return (f"## {title}\n\n" + _table(["figure", "direction", "original", "compressed", "change"], rows)
            + f"\n\n*Measured with: {M.describe_conditions(bench['measured_with'])}.*")


def _plots(plots: list[str]) -> str:
    if not plots:
        return ""
    return "## Plots\n\n" + "\n\n".join(f"![{p.rsplit('/', 1)[-1].rsplit('.', 1)[0]}]({p})" for p in plots)


def _notes(report: dict) -> str:
    if not report["notes"]:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {n}" for n in report["notes"])


def _environment(report: dict) -> str:
    env = report["environment"]
    lines = ["## Environment", ""]
    for key in ("device", "gpu", "cpu", "cpu_count", "threads", "dtype", "seed", "python", "platform"):
        if env.get(key) is not None:
            lines.append(f"- {key}: {env[key]}")
    if env.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    lines += ["", "Recipe:", "", "```json", json.dumps(report["recipe"], indent=2), "```"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _kv(d: dict[str, Any], limit: int = 120) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, (list, tuple)):
            v = "/".join(str(x) for x in v)
        elif isinstance(v, dict):
            v = json.dumps(v, separators=(",", ":"))
        parts.append(f"{k}={v}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
