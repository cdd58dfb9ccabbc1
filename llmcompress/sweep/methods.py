"""The methods table (docs/methods.md): a sweep over methods written as one row per method, the original on top, how
and where it was measured, and what the rows say. Its rows are the sweep's leaderboard rows (``run_row``).

    llmcompress sweep recipes/sweeps/methods.yaml      # the sweep file's `markdown: ../../docs/methods.md`

Nothing in the table is typed by hand: figures and their wording come from each run's report.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..report import metrics as M
from ..report.leaderboard import COMPRESSING, weight_form
from ..report.markdown import _table  # the report's own Markdown table (escapes |)
from ..utils.io import atomic_write_text
from .expand import Point

NEEDS_GPU = "needs a CUDA GPU — not run here"
#: A section another script writes into the same file (benchmarks/ladder.py), kept as it is.
KEEP = ("<!-- ladder:begin -->", "<!-- ladder:end -->")


@dataclass
class Entry:
    """One method of the sweep: its point's compressing stage, its leaderboard row and (when it ran) its report."""

    name: str
    method: str
    kind: str  # "quantize" | "prune"
    stage: dict  # the compressing stage as the sweep wrote it
    row: dict
    report: dict | None

    @property
    def bits(self) -> float | None:
        """Nominal bits per weight of the compressed layers: the run's figure, else what the config says."""
        if self.kind == "prune":
            return 16.0
        return self.row.get("bits") if self.report else _config_bits(self.method, self.stage)

    @property
    def bits_text(self) -> str:
        form = self.row.get("form") if self.report else weight_form(self.kind, self.stage)
        if self.kind == "prune":
            return f"16 ({form})"
        text = M.fmt_number(self.bits) if self.bits is not None else "?"
        return text + (f" ({form})" if form else "")

    @property
    def status(self) -> str:
        """Why a row has no figures (skipped here, failed, not run yet)."""
        error = " ".join(str(self.row.get("error") or "").split())
        if self.row.get("status") == "skipped":
            gpu = any(w in error for w in ("CUDA", "GPU", "cuda"))
            return NEEDS_GPU if gpu else f"cannot run here: {error[:200]}"
        if self.row.get("status") == "failed":
            return f"failed: {error[:200]}"
        return "not run yet"


def _config_bits(method: str, stage: dict) -> float | None:
    from ..quant import QUANTIZERS

    try:
        return QUANTIZERS.get(method).model_validate(stage).bits_per_weight()
    except Exception:  # an unregistered or invalid stage: the row says "?"
        return None


def entries(points: list[Point], rows: list[dict], outcomes: list[dict]) -> list[Entry]:
    """One Entry per point with a compressing stage, in the table's order (quantize by bits, rtn first; then prune)."""
    by_name = {r["name"]: r for r in rows if r.get("status") != "reference"}
    reports = {o["name"]: o.get("report") for o in outcomes}
    out = []
    for p in points:
        stage = next((s for s in p.raw.get("stages") or [] if isinstance(s, dict) and s.get("type") in COMPRESSING),
                     None)
        if stage is not None:
            out.append(Entry(p.name, str(stage.get("method")), stage["type"], stage,
                             by_name.get(p.name, {"name": p.name}), reports.get(p.name)))
    return sorted(out, key=lambda e: (e.kind == "prune", -(e.bits or 0), e.method != "rtn", e.method))


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def _with_change(value: str, change: Any) -> str:
    return f"{value} ({change})" if change else value


def row_cells(e: Entry, link: str) -> list[str]:
    """The table row of one method: the leaderboard row's figures with the report's own wording of the change."""
    head = [f"**{e.method}**" + (" (prune)" if e.kind == "prune" else ""), link, e.bits_text]
    if e.report is None:
        return head + [e.status] + [""] * 6
    r = e.row
    return head + [
        _with_change(M.fmt_bytes(r["size_bytes"]), r.get("size_change") or "—"),
        _with_change(M.fmt_number(r["quality"]), r.get("quality_change")) if r.get("quality") is not None else "—",
        M.fmt_number(r.get("kl_mean")),
        f"{r['top1_agreement']:.1%}" if M.is_number(r.get("top1_agreement")) else "—",
        _with_change(M.fmt_number(r["accuracy"]), _flat(r.get("accuracy_change") or ""))
        if r.get("accuracy") is not None else "—",
        _with_change(M.fmt_value(r["speed_figure"], r["speed"]), r.get("speed_change"))
        if r.get("speed") is not None else "—",
        f"{r['compress_seconds']:.1f} s" if M.is_number(r.get("compress_seconds")) else "—",
    ]


def _flat(change: str) -> str:
    """The report's "+1.0 pts (within noise)" as "+1.0 pts, within noise" (it sits inside parentheses here)."""
    return change.replace(" (within noise)", ", within noise")


def original_cells(ran: list[Entry]) -> list[str]:
    """The original: its figures from the first run (the evaluation is cached, so all runs share them); its decode
    speed is the median over runs (each run measures it again, interleaved with the compressed model)."""
    r = ran[0].row
    decs = [e.row.get("speed_original") for e in ran if M.is_number(e.row.get("speed_original"))]
    dec = "—"
    if decs:
        dec = M.fmt_value(r["speed_figure"], statistics.median(decs))
        if len(decs) > 1:
            dec += f" (median of {len(decs)} runs, {min(decs):.1f}–{max(decs):.1f})"
    return ["**original**", "—", "16 (bf16 on disk)", M.fmt_bytes(r.get("size_original_bytes")),
            M.fmt_number(r.get("quality_original")), "—", "—", M.fmt_number(r.get("accuracy_original")), dec, "—"]


def header(ran: list[Entry], threads: str) -> list[str]:
    """Column titles; the quality, accuracy and speed titles name the figures the rows hold."""
    row = ran[0].row if ran else {}
    quality = str(row.get("quality_metric") or "perplexity").replace(":", " ")
    accuracy = str(row.get("accuracy_metric") or "accuracy").replace(":", " ")
    batch = M.split_batch(str(row.get("speed_figure") or "decode_tok_s_bs1"))[1] or 1
    speed = f"decode tok/s, batch {batch}" + (f", {threads} thread{'s' if threads != '1' else ''}" if ran else "")
    return ["method", "recipe", "bits / weight", "size on disk", f"{quality} (vs original)", "KL vs original",
            "top-1 agreement", f"{accuracy} (vs original)", f"{speed} (vs original)", "quantize / prune time"]


# ---------------------------------------------------------------------------------------------------------------------
# How it was measured


def _common(values: list, fmt=str) -> str:
    """One value when all runs agree, else every distinct value (so a mixed table says so)."""
    distinct = list(dict.fromkeys(fmt(v) for v in values if v is not None))
    return distinct[0] if len(distinct) == 1 else " / ".join(distinct) + " (differs between runs)" if distinct else "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings_lines(ran: list[Entry], command: str) -> list[str]:
    """Machine, versions and how quality and speed were measured, stated once (and flagged where runs differ)."""
    envs = [e.report["environment"] for e in ran]
    ev = [(e.report["comparison"].get("eval") or {}).get("measured_with") or {} for e in ran]
    be = [(e.report["comparison"].get("bench") or {}).get("measured_with") or {} for e in ran]
    backends = [x.get("backend") or ", ".join(x.get("backends") or []) or None for x in be]
    versions: dict[str, list] = {}
    for env in envs:
        for k, v in (env.get("versions") or {}).items():
            versions.setdefault(k, []).append(v)
    ppl = [x.get("perplexity") or {} for x in ev]
    kl_tokens = _common([e.report["models"]["compressed"].get("kl", {}).get("tokens") for e in ran], M.fmt_number)
    started = sorted(env["started"] for env in envs if env.get("started"))
    finished = sorted(env["finished"] for env in envs if env.get("finished"))
    return [
        f"- Generated by `{command}` on {dt.date.today().isoformat()} from {len(ran)} run "
        f"folder{'s' if len(ran) != 1 else ''} "
        f"(runs between {started[0][:16] if started else '?'} and {finished[-1][:16] if finished else '?'} UTC).",
        f"- Machine: {cpu_model()} ({_common([env.get('cpu_count') for env in envs])} cores, shared with other jobs), "
        f"device {_common([env.get('device') for env in envs])}, torch threads "
        f"{_common([env.get('threads') for env in envs])}, "
        f"compute dtype {_common([env.get('dtype') for env in envs], M.short_dtype)}.",
        "- Versions: " + ", ".join(f"{k} {_common(v)}" for k, v in versions.items()) + ".",
        f"- Quality: lm-eval tasks {_common([', '.join(x.get('tasks') or []) for x in ev])} "
        f"(limit {_common([x.get('limit') for x in ev])} items per task, "
        f"{_common([x.get('num_fewshot') for x in ev])}-shot); perplexity on "
        f"{_common([p.get('corpus') for p in ppl])}, the first {_common([p.get('max_tokens') for p in ppl])} tokens, "
        f"windows of {_common([p.get('ctx_len') for p in ppl])} tokens every "
        f"{_common([p.get('stride') for p in ppl])}; "
        f"KL(original ‖ compressed) and top-1 agreement over the same {kl_tokens} token positions.",
        f"- Speed: {_common(backends)} backend (transformers `generate`, greedy), "
        f"prompt {_common([x.get('prompt_tokens') for x in be])} tokens + "
        f"{_common([x.get('new_tokens') for x in be])} new tokens, batch sizes "
        f"{_common([x.get('batch_sizes') for x in be], lambda v: ', '.join(map(str, v)))}, "
        f"{_common([x.get('repeats') for x in be])} timed rounds (medians), original and compressed interleaved "
        f"call by call in the same process; the ratio is the median of per-round paired ratios.",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# What the rows say


def facts(entries_: list[Entry]) -> list[str]:
    """Statements computed from the rows: rankings and the calibrated-vs-rtn check."""
    ran = [e for e in entries_ if e.report is not None and e.row.get("quality") is not None]
    out = []
    quant = [e for e in ran if e.kind == "quantize"]
    for bits in sorted({e.bits for e in quant}, key=lambda b: b or 0):
        group = sorted((e for e in quant if e.bits == bits), key=lambda e: e.row["quality"])
        ranking = ", ".join(f"{e.method} {M.fmt_number(e.row['quality'])} ({e.row['quality_change']})" for e in group)
        out.append(f"At {M.fmt_number(bits)} bits, by perplexity (lower is better): {ranking}. "
                   f"Original: {M.fmt_number(group[0].row['quality_original'])}.")
    out += calibrated_vs_rtn(quant)
    prune = sorted((e for e in ran if e.kind == "prune"), key=lambda e: e.row["quality"])
    if len(prune) > 1:
        out.append("Pruning without recovery, by perplexity: " + ", ".join(
            f"{e.method} {e.bits_text.removeprefix('16 ')} {M.fmt_number(e.row['quality'])} ({e.row['quality_change']})"
            for e in prune) + ".")
    done = [e for e in entries_ if e.report is not None]
    sized = [e for e in done if e.row.get("size_shrink")]
    if sized:
        best = max(sized, key=lambda e: e.row["size_shrink"])
        out.append(f"Smallest on disk: {best.method}, {M.fmt_bytes(best.row['size_bytes'])} "
                   f"({best.row['size_change']}).")
    out += _speed_fact([e for e in done if M.is_number(e.row.get("speedup"))])
    accs = [e for e in done if e.row.get("accuracy") is not None and e.row.get("accuracy_within_noise") is not None]
    if accs:
        outside = [f"{e.method} ({e.row['accuracy_change']})" for e in accs if not e.row["accuracy_within_noise"]]
        se = statistics.median(e.row["accuracy_stderr"] for e in accs)
        out.append(f"Multiple-choice accuracy ({accs[0].row['accuracy_metric'].split(':')[0]}) is a small sample "
                   f"(combined standard error ≈ {se * 100:.0f} pts): "
                   + (f"changes outside 1.96 standard errors: {', '.join(outside)}." if outside
                      else "no change is outside 1.96 standard errors; read perplexity and KL for quality."))
    return out


def _speed_fact(timed: list[Entry]) -> list[str]:
    if not timed:
        return []
    faster = [e for e in timed if e.row["speedup"] >= 1 + M.SPEED_TOLERANCE]
    slower = sorted((e for e in timed if e.row["speedup"] <= 1 - M.SPEED_TOLERANCE), key=lambda e: e.row["speedup"])

    def listed(group: list[Entry]) -> str:
        return ", ".join(f"{e.method} ({e.row['speed_change']})" for e in group)

    return ["Decode at batch 1 vs the original in the same run: "
            + (f"faster: {listed(faster)}; " if faster else "no method is faster; ")
            + (f"slower: {listed(slower)}" if slower else "none is slower")
            + f"; the rest within ±{M.SPEED_TOLERANCE:.0%} (reads as about the same on this shared machine)."]


def calibrated_vs_rtn(quant: list[Entry]) -> list[str]:
    """Does every GPTQ/AWQ-style method beat round-to-nearest at the same bits (issue 3's acceptance check)?"""
    out = []
    rtn = {e.bits: e for e in quant if e.method == "rtn"}
    for e in quant:
        if not any(w in e.method for w in ("gptq", "awq")):
            continue
        base = rtn.get(e.bits)
        if base is None:
            out.append(f"{e.method}: no rtn run at {M.fmt_number(e.bits)} bits to compare with.")
            continue
        a, b = e.row["quality"], base.row["quality"]
        verdict = "beats" if a < b else "does NOT beat"
        same_form = e.bits_text == base.bits_text
        out.append(f"{e.method} {verdict} rtn at {M.fmt_number(e.bits)} bits: perplexity {M.fmt_number(a)} vs "
                   f"{M.fmt_number(b)} ({(a - b) / b * 100:+.1f}%), KL {M.fmt_number(e.row.get('kl_mean'))} vs "
                   f"{M.fmt_number(base.row.get('kl_mean'))}"
                   + ("" if same_form else f" (not the same format: {e.bits_text} vs rtn {base.bits_text})") + ".")
    return out


def _secs(v: Any) -> str:
    return f"{v:.0f}" if M.is_number(v) else "—"


def runs_table(entries_: list[Entry]) -> str:
    rows = []
    for e in entries_:
        if e.report is None:
            continue
        secs = e.row.get("stage_seconds") or {}
        total = sum(v for v in secs.values() if M.is_number(v))
        evaluate = _secs(secs.get("evaluate")) + (" (original cached)" if e.row.get("original_cached") else "")
        rows.append([e.name, (e.report["environment"].get("finished") or "?")[:16], _secs(secs.get(e.kind)),
                     evaluate, _secs(secs.get("benchmark")), _secs(total)])
    return _table(["run", "finished (UTC)", "compress s", "evaluate s", "benchmark s", "total s"], rows)


# ---------------------------------------------------------------------------------------------------------------------
# The page


def render(summary: dict, points: list[Point], output: Path | None = None) -> str:
    """docs/methods.md's page from a sweep's summary (its rows and outcomes) and points. ``output``: where the page
    goes (the recipe column links to the sweep file relative to it)."""
    found = entries(points, summary["rows"], summary["outcomes"])
    ran = [e for e in found if e.report is not None]
    command = f"llmcompress sweep {summary['file']}"
    sweep_file = Path(summary["file"]).resolve()
    target = os.path.relpath(sweep_file, Path(output).resolve().parent) if output else str(summary["file"])
    models = sorted({str(p.raw.get("model")) for p in points})
    lines = [f"# Compression methods on `{', '.join(models)}`", "",
             f"<!-- Generated by `{command}` from its runs' report.json; do not edit by hand. -->", ""]
    threads = _common([e.report["environment"].get("threads") for e in ran])
    rows = [row_cells(e, f"[{e.name}]({target})") for e in found]
    if not ran:
        return "\n".join(lines + [f"No run has a report yet: `{command}`.", "", _table(header([], ""), rows), ""])
    lines += settings_lines(ran, command) + [""]
    meta = ran[0].report["models"]["original"]["meta"]
    source = Path(str(meta.get("source", ""))).name
    note = "; ".join(x for x in (meta.get("note"), f"source `{source}`" if source else "") if x)
    if note:
        lines += [f"Original: {note}.", ""]
    lines += [_table(header(ran, threads), [original_cells(ran)] + rows), ""]
    lines += ["Size: weight files of the model folder (MiB = 2^20 bytes). Perplexity and accuracy changes: the "
              "report's wording (relative % for perplexity, points for accuracy, \"within noise\" when smaller than "
              "1.96 combined standard errors). Decode speed ratio: compressed vs original in the same run. Pruned "
              "models store their zeros dense (no size or CPU speed change by design).", ""]
    missing = [e.method for e in found if e.report is None]
    if missing:
        lines += ["Rows without figures (see the row for why): " + ", ".join(missing) + ".", ""]
    absent = [m for m in registered_methods() if m not in {e.method for e in found}]
    if absent:
        lines += [f"Registered methods not in `{summary['file']}`: " + ", ".join(absent) + ".", ""]
    lines += ["## Reading the table", "", *[f"- {f}" for f in facts(found)], ""]
    lines += ["## Runs", "", runs_table(found), "",
              "Stage times as each stage recorded them (a resumed stage keeps the time of the run that made it).", ""]
    return "\n".join(lines)


def registered_methods() -> list[str]:
    """Every registered quantize and prune method, in registry order."""
    from ..prune import PRUNERS
    from ..quant import QUANTIZERS

    return [*QUANTIZERS.names(), *PRUNERS.names()]


def write(path: Path, text: str) -> Path:
    """Write the page, keeping the section another script wrote between the ``KEEP`` markers."""
    old = path.read_text() if path.is_file() else ""
    begin, end = KEEP
    if begin in old and end in old:
        text = text.rstrip() + "\n\n" + old[old.index(begin): old.index(end) + len(end)] + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path
