"""Build docs/methods.md: one row per compression method on the default model, read from the runs' report.json files.

    python scripts/methods_table.py                      # the table from runs/methods/<recipe>/ as they stand
    python scripts/methods_table.py --run                # run every method recipe first (finished stages resume)
    python scripts/methods_table.py --run --only smollm2-rtn4 gptq --lock /tmp/llmcompress-heavy.lock

A method recipe is a recipe in recipes/ on the default model with exactly one quantize or prune stage; every method
in the quantize and prune registries gets exactly one row (the recipe named ``smollm2-*`` wins over e.g. quickstart).
Nothing in the table is typed by hand: figures and their wording come from each run's report (llmcompress.report).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmcompress.errors import LLMCompressError
from llmcompress.report import load_report
from llmcompress.report import metrics as M
from llmcompress.report.markdown import _table  # the report's own Markdown table (escapes |)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m"
COMPRESSING = ("quantize", "prune")
#: A method recipe: one compressing stage, then only measuring stages (no LoRA, merge or export in between).
MEASURING = ("evaluate", "benchmark")
NEEDS_GPU = "needs a CUDA GPU — not run here"
#: The figures of the table: (task, metric) of the multiple-choice accuracy and the decode figure at batch 1.
ACCURACY = ("pydoc_cloze", "acc")
DECODE = "decode_tok_s_bs1"


@dataclass
class MethodRun:
    """One method: its recipe, its run folder and, once loaded, its report (or why there is none)."""

    method: str
    kind: str  # "quantize" | "prune"
    recipe: Path
    name: str  # recipe name = run folder name
    stage: dict  # the compressing stage as written in the recipe
    run_dir: Path
    also: list[str] = field(default_factory=list)  # other recipes of the same method (not used)
    blocked: str | None = None  # why it cannot run on this machine
    report: dict | None = None
    status: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Which recipes


def registered_methods() -> list[tuple[str, str]]:
    """``(kind, method)`` of every registered quantize and prune method, in registry order."""
    from llmcompress.prune import PRUNERS
    from llmcompress.quant import QUANTIZERS

    return [("quantize", m) for m in QUANTIZERS.names()] + [("prune", m) for m in PRUNERS.names()]


def _compressing_stages(raw: dict) -> list[dict]:
    return [s for s in raw.get("stages") or [] if isinstance(s, dict) and s.get("type") in COMPRESSING]


def discover(recipes_dir: Path, runs_dir: Path, model: str = DEFAULT_MODEL) -> list[MethodRun]:
    """One MethodRun per registered method (a row saying so where no recipe has it), in registry order."""
    by_method: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        stages = _compressing_stages(raw)
        types = [s.get("type") for s in raw.get("stages") or [] if isinstance(s, dict)]
        if raw.get("model") != model or len(stages) != 1 or not set(types) <= {*COMPRESSING, *MEASURING}:
            continue  # another model, or a pipeline (several methods, recovery, export) rather than one method
        by_method.setdefault(str(stages[0].get("method")), []).append((path, raw))
    registered = registered_methods()
    known = {m for _, m in registered}
    out = []
    extra = [("?", m) for m in by_method if m not in known]  # recipes of a method no registry knows (still shown)
    for kind, method in registered + extra:
        found = sorted(by_method.get(method, []), key=_preference)
        if not found:
            out.append(MethodRun(method, kind, Path(), "", {}, Path(), status=f"no recipe on {model} in {recipes_dir}"))
            continue
        (path, raw), rest = found[0], found[1:]
        stage = _compressing_stages(raw)[0]
        out.append(MethodRun(method, stage["type"], path, raw["name"], stage, Path(runs_dir) / raw["name"],
                             also=[r["name"] for _, r in rest]))
    return out


def _preference(recipe: tuple[Path, dict]) -> tuple:
    """Among recipes of one method, `smollm2-*` first (quickstart and other demos only when there is no other)."""
    name = recipe[1]["name"]
    return (not name.startswith("smollm2-"), name)


def check_runnable(m: MethodRun) -> None:
    """Set ``m.blocked`` when the recipe cannot run here (a CUDA-only method or device on a machine without CUDA)."""
    import torch

    from llmcompress.pipeline import preflight
    from llmcompress.recipe import load_recipe

    try:
        recipe = load_recipe(m.recipe)
        if recipe.device == "cuda" and not torch.cuda.is_available():
            m.blocked = NEEDS_GPU
            return
        preflight(recipe)
    except LLMCompressError as e:
        text = str(e)
        gpu = any(w in text for w in ("CUDA", "GPU", "cuda")) and not torch.cuda.is_available()
        m.blocked = NEEDS_GPU if gpu else f"cannot run here: {text.splitlines()[0]}"


def run_recipe_cli(m: MethodRun, lock: Path | None) -> float:
    """``llmcompress run RECIPE --output runs/methods/NAME`` in a subprocess (optionally under an flock); seconds."""
    cmd = [sys.executable, "-m", "llmcompress.cli", "run", str(m.recipe), "--output", str(m.run_dir), "-q"]
    with open(lock, "w") if lock else contextlib.nullcontext() as fh:
        if fh is not None:
            print(f"[methods_table] waiting for {lock} ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        print(f"[methods_table] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        seconds = time.perf_counter() - t0
    print(f"[methods_table] {m.name}: exit {rc} after {seconds:.0f} s", flush=True)
    return seconds


def load_runs(methods: list[MethodRun]) -> None:
    """Attach each run's report; say why a row has none."""
    for m in methods:
        if not m.name:
            continue
        try:
            m.report = load_report(m.run_dir)
            m.status = "ok"
        except LLMCompressError:
            m.status = m.blocked or _unfinished(m.run_dir) or f"not run (no {_rel(m.run_dir)}/report.json)"


def _unfinished(run_dir: Path) -> str | None:
    """"did not finish: ..." for a run folder whose last stage never wrote its result (stopped or killed)."""
    stages = sorted(p for p in run_dir.glob("[0-9][0-9]-*") if p.is_dir()) if run_dir.is_dir() else []
    pending = [p.name for p in stages if not (p / "result.json").is_file()]
    if not pending:
        return None
    done = [p.name for p in stages if (p / "result.json").is_file()]
    return (f"did not finish: stopped in {pending[0]}" + (f" after {', '.join(done)}" if done else "")
            + f" ({_rel(run_dir)}; the same command resumes it)")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Figures of one run


def _stage(report: dict, kind: str) -> dict | None:
    found = [s for s in report["stages"] if s["type"] == kind]
    return found[-1] if found else None


def _eval_entry(report: dict, task: str, metric: str) -> dict | None:
    return (((report["comparison"].get("eval") or {}).get("metrics") or {}).get(task) or {}).get(metric)


def _bench_entry(report: dict, figure: str) -> dict | None:
    return ((report["comparison"].get("bench") or {}).get("figures") or {}).get(figure)


def _kl(report: dict, name: str):
    return ((report["comparison"].get("kl") or {}).get("metrics") or {}).get(name, {}).get("value")


def bits_text(m: MethodRun) -> str:
    """Nominal bits per weight of the compressed layers (and the group size or the sparsity)."""
    data = (_stage(m.report, m.kind) or {}).get("data", {}) if m.report else {}
    cfg = {**m.stage, **((_stage(m.report, m.kind) or {}).get("config") or {})} if m.report else m.stage
    if m.kind == "prune":
        what = cfg.get("pattern") or (f"{cfg['sparsity']:.0%} zeros" if cfg.get("sparsity") else "pruned")
        return f"16 ({what})"
    bits = data.get("bits")
    if bits is None:
        bits = _config_bits(m)
    text = M.fmt_number(bits) if bits is not None else "?"
    details = [f"g{cfg['group_size']}" if cfg.get("group_size") else "", _symmetry(cfg)]
    details = [d for d in details if d]
    return text + (f" ({', '.join(details)})" if details else "")


def _symmetry(cfg: dict) -> str:
    """"sym" (no zero point) or "asym" where the method's config says, else ""."""
    sym = cfg.get("symmetric", cfg.get("sym"))
    return "" if sym is None else ("sym" if sym else "asym")


def _config_bits(m: MethodRun) -> float | None:
    from llmcompress.quant import QUANTIZERS

    try:
        return QUANTIZERS.get(m.method).model_validate(m.stage).bits_per_weight()
    except Exception:  # an unregistered or invalid stage: the row says "?"
        return None


def nominal_bits(m: MethodRun) -> float | None:
    if m.kind == "prune":
        return 16.0
    data = (_stage(m.report, m.kind) or {}).get("data", {}) if m.report else {}
    return data.get("bits", _config_bits(m))


def compress_seconds(report: dict, kind: str):
    data = (_stage(report, kind) or {}).get("data") or {}
    return data.get(f"{kind}_seconds")


def row(m: MethodRun) -> list[str]:
    """The table row of one method (figures with the report's own wording of the change)."""
    link = f"[{m.name}](../{_rel(m.recipe)})" if m.name and m.recipe.is_relative_to(ROOT) else m.name
    head = [f"**{m.method}**" + (" (prune)" if m.kind == "prune" else ""), link or "—", bits_text(m) if m.name else "—"]
    if m.report is None:
        return head + [m.status] + [""] * 6
    r = m.report
    size = r["comparison"]["size"]
    ppl = _eval_entry(r, "perplexity", "perplexity")
    acc = _eval_entry(r, *ACCURACY)
    dec = _bench_entry(r, DECODE)
    kl, top1 = _kl(r, "kl_mean"), _kl(r, "top1_agreement")
    secs = compress_seconds(r, m.kind)
    return head + [
        f"{M.fmt_bytes(size['compressed_bytes'])} ({size.get('change', '—')})",
        f"{M.fmt_number(ppl['compressed'])} ({ppl['change']})" if ppl else "—",
        M.fmt_number(kl),
        f"{top1:.1%}" if M.is_number(top1) else "—",
        f"{M.fmt_number(acc['compressed'])} ({_flat(acc['change'])})" if acc else "—",
        f"{M.fmt_value(DECODE, dec['compressed'])} ({dec['change']})" if dec else "—",
        f"{secs:.1f} s" if M.is_number(secs) else "—",
    ]


def _flat(change: str) -> str:
    """The report's "+1.0 pts (within noise)" as "+1.0 pts, within noise" (it sits inside parentheses here)."""
    return change.replace(" (within noise)", ", within noise")


def original_row(ran: list[MethodRun]) -> list[str]:
    """The original model: its figures from the first run (the evaluation is cached, so all runs share them); its decode
    speed is the median over runs (each run measures it again, interleaved with the compressed model)."""
    r = ran[0].report
    orig = r["models"]["original"]
    ppl = (orig["eval"].get("perplexity") or {}).get("perplexity")
    acc = (orig["eval"].get(ACCURACY[0]) or {}).get(ACCURACY[1])
    decs = [m.report["models"]["original"]["bench"].get(DECODE) for m in ran]
    decs = [d for d in decs if M.is_number(d)]
    dec = "—"
    if decs:
        dec = M.fmt_value(DECODE, statistics.median(decs))
        if len(decs) > 1:
            dec += f" (median of {len(decs)} runs, {min(decs):.1f}–{max(decs):.1f})"
    return ["**original**", "—", "16 (bf16 on disk)", M.fmt_bytes(orig["size_bytes"]), M.fmt_number(ppl), "—", "—",
            M.fmt_number(acc), dec, "—"]


HEADER = ["method", "recipe", "bits / weight", "size on disk", "perplexity (vs original)", "KL vs original",
          "top-1 agreement", "pydoc_cloze acc (vs original)", "decode tok/s, batch 1 (vs original)",
          "quantize / prune time"]


# ---------------------------------------------------------------------------------------------------------------------
# The page


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


def _eval_settings(r: dict) -> dict:
    return (r["comparison"].get("eval") or {}).get("measured_with") or {}


def _bench_settings(r: dict) -> dict:
    return (r["comparison"].get("bench") or {}).get("measured_with") or {}


def settings_lines(ran: list[MethodRun]) -> list[str]:
    """Machine, versions and how quality and speed were measured, stated once (and flagged where runs differ)."""
    envs = [m.report["environment"] for m in ran]
    ev = [_eval_settings(m.report) for m in ran]
    be = [_bench_settings(m.report) for m in ran]
    threads = _common([e.get("threads") for e in envs])
    versions = {}
    for e in envs:
        for k, v in (e.get("versions") or {}).items():
            versions.setdefault(k, []).append(v)
    ppl = [e.get("perplexity") or {} for e in ev]
    kl_tokens = _common([m.report["models"]["compressed"].get("kl", {}).get("tokens") for m in ran], M.fmt_number)
    started = sorted(e["started"] for e in envs if e.get("started"))
    finished = sorted(e["finished"] for e in envs if e.get("finished"))
    return [
        f"- Generated by `scripts/methods_table.py` on {dt.date.today().isoformat()} from {len(ran)} run "
        f"folder{'s' if len(ran) != 1 else ''} "
        f"(runs between {started[0][:16] if started else '?'} and {finished[-1][:16] if finished else '?'} UTC).",
        f"- Machine: {cpu_model()} ({_common([e.get('cpu_count') for e in envs])} cores, shared with other jobs), "
        f"device {_common([e.get('device') for e in envs])}, torch threads {threads}, "
        f"compute dtype {_common([e.get('dtype') for e in envs], M.short_dtype)}.",
        "- Versions: " + ", ".join(f"{k} {_common(v)}" for k, v in versions.items()) + ".",
        f"- Quality: lm-eval tasks {_common([', '.join(e.get('tasks') or []) for e in ev])} "
        f"(limit {_common([e.get('limit') for e in ev])} items per task, "
        f"{_common([e.get('num_fewshot') for e in ev])}-shot); perplexity on "
        f"{_common([p.get('corpus') for p in ppl])}, the first {_common([p.get('max_tokens') for p in ppl])} tokens, "
        f"windows of {_common([p.get('ctx_len') for p in ppl])} tokens every "
        f"{_common([p.get('stride') for p in ppl])}; "
        f"KL(original ‖ compressed) and top-1 agreement over the same {kl_tokens} token positions.",
        f"- Speed: {_common([e.get('backend') for e in be])} backend (transformers `generate`, greedy), "
        f"prompt {_common([e.get('prompt_tokens') for e in be])} tokens + "
        f"{_common([e.get('new_tokens') for e in be])} new tokens, batch sizes "
        f"{_common([e.get('batch_sizes') for e in be], lambda v: ', '.join(map(str, v)))}, "
        f"{_common([e.get('repeats') for e in be])} timed rounds (medians), original and compressed interleaved "
        f"call by call in the same process; the ratio is the median of per-round paired ratios.",
    ]


def sort_key(m: MethodRun) -> tuple:
    bits = nominal_bits(m) if m.name else None
    return (m.kind == "prune", -(bits or 0), m.method != "rtn", m.method)  # rtn, the baseline, first in its group


def facts(methods: list[MethodRun]) -> list[str]:
    """Statements computed from the rows: rankings and the calibrated-vs-rtn check."""
    ran = [m for m in methods if m.report is not None]
    ppl = {m.method: _eval_entry(m.report, "perplexity", "perplexity") for m in ran}
    ppl = {k: v for k, v in ppl.items() if v}
    out = []
    quant = [m for m in ran if m.kind == "quantize" and m.method in ppl]
    for bits in sorted({nominal_bits(m) for m in quant}, key=lambda b: b or 0):
        group = sorted((m for m in quant if nominal_bits(m) == bits), key=lambda m: ppl[m.method]["compressed"])
        ranking = ", ".join(f"{m.method} {M.fmt_number(ppl[m.method]['compressed'])} ({ppl[m.method]['change']})"
                            for m in group)
        original = group[0].report["models"]["original"]["eval"]["perplexity"]["perplexity"]
        out.append(f"At {M.fmt_number(bits)} bits, by perplexity (lower is better): {ranking}. "
                   f"Original: {M.fmt_number(original)}.")
    out += calibrated_vs_rtn(quant, ppl)
    prune = sorted((m for m in ran if m.kind == "prune" and m.method in ppl), key=lambda m: ppl[m.method]["compressed"])
    if len(prune) > 1:
        out.append("Pruning without recovery, by perplexity: " + ", ".join(
            f"{m.method} {bits_text(m).removeprefix('16 ')} {M.fmt_number(ppl[m.method]['compressed'])} "
            f"({ppl[m.method]['change']})"
            for m in prune) + ".")
    sized = [m for m in ran if m.report["comparison"]["size"].get("shrink")]
    if sized:
        best = max(sized, key=lambda m: m.report["comparison"]["size"]["shrink"])
        size = best.report["comparison"]["size"]
        out.append(f"Smallest on disk: {best.method}, {M.fmt_bytes(size['compressed_bytes'])} ({size['change']}).")
    speed = {m.method: _bench_entry(m.report, DECODE) for m in ran}
    speed = {k: v for k, v in speed.items() if v and M.is_number(v.get("speedup"))}
    if speed:
        faster = [k for k, v in speed.items() if v["speedup"] >= 1 + M.SPEED_TOLERANCE]
        slower = sorted((k for k, v in speed.items() if v["speedup"] <= 1 - M.SPEED_TOLERANCE),
                        key=lambda k: speed[k]["speedup"])
        def listed(names: list[str]) -> str:
            return ", ".join(f"{k} ({speed[k]['change']})" for k in names)

        out.append("Decode at batch 1 vs the original in the same run: "
                   + (f"faster: {listed(faster)}; " if faster else "no method is faster; ")
                   + (f"slower: {listed(slower)}" if slower else "none is slower")
                   + f"; the rest within ±{M.SPEED_TOLERANCE:.0%} (reads as about the same on this shared machine).")
    accs = [(m.method, _eval_entry(m.report, *ACCURACY)) for m in ran]
    accs = [(k, e) for k, e in accs if e and "within_noise" in e]
    if accs:
        outside = [f"{k} ({e['change']})" for k, e in accs if not e["within_noise"]]
        se = statistics.median(e["stderr"] for _, e in accs)
        out.append(f"Multiple-choice accuracy ({ACCURACY[0]}) is a small sample (combined standard error ≈ "
                   f"{se * 100:.0f} pts): " + (f"changes outside 1.96 standard errors: {', '.join(outside)}."
                                                 if outside else "no change is outside 1.96 standard errors; "
                                                 "read perplexity and KL for quality."))
    return out


def calibrated_vs_rtn(quant: list[MethodRun], ppl: dict) -> list[str]:
    """Does every GPTQ/AWQ-style method beat round-to-nearest at the same bits (issue 3's acceptance check)?"""
    out = []
    rtn = {nominal_bits(m): m for m in quant if m.method == "rtn"}
    for m in quant:
        if not any(w in m.method for w in ("gptq", "awq")):
            continue
        base = rtn.get(nominal_bits(m))
        if base is None:
            out.append(f"{m.method}: no rtn run at {M.fmt_number(nominal_bits(m))} bits to compare with.")
            continue
        a, b = ppl[m.method]["compressed"], ppl["rtn"]["compressed"]
        ka, kb = _kl(m.report, "kl_mean"), _kl(base.report, "kl_mean")
        verdict = "beats" if a < b else "does NOT beat"
        same_form = bits_text(m) == bits_text(base)
        out.append(f"{m.method} {verdict} rtn at {M.fmt_number(nominal_bits(m))} bits: perplexity {M.fmt_number(a)} vs "
                   f"{M.fmt_number(b)} ({(a - b) / b * 100:+.1f}%), KL {M.fmt_number(ka)} vs {M.fmt_number(kb)}"
                   + ("" if same_form else f" (not the same format: {bits_text(m)} vs rtn {bits_text(base)})") + ".")
    return out


def _secs(v) -> str:
    return f"{v:.0f}" if M.is_number(v) else "—"


def runs_table(methods: list[MethodRun]) -> str:
    rows = []
    for m in methods:
        if m.report is None:
            continue
        secs = {s["type"]: s.get("seconds") for s in m.report["stages"]}
        total = sum(v for v in secs.values() if M.is_number(v))
        ev = next((s for s in m.report["stages"] if s["type"] == "evaluate"), None)
        cached = ((ev or {}).get("data", {}).get("timing", {}).get("original", {}).get("cached"))
        evaluate = _secs(secs.get("evaluate")) + (" (original cached)" if cached else "")
        rows.append([m.name, (m.report["environment"].get("finished") or "?")[:16], _secs(secs.get(m.kind)),
                     evaluate, _secs(secs.get("benchmark")), _secs(total)])
    return _table(["run", "finished (UTC)", "compress s", "evaluate s", "benchmark s", "total s"], rows)


def render(methods: list[MethodRun], model: str = DEFAULT_MODEL) -> str:
    ran = [m for m in methods if m.report is not None]
    default = " (the default model)" if model == DEFAULT_MODEL else ""
    lines = [f"# Compression methods on `{model}`{default}", "",
             "<!-- Generated by scripts/methods_table.py from runs/methods/*/report.json; do not edit by hand. -->", ""]
    if not ran:
        lines += ["No run folder has a report yet: `python scripts/methods_table.py --run`.", "",
                  _table(HEADER, [row(m) for m in methods]), ""]
        return "\n".join(lines)
    threads = _common([m.report["environment"].get("threads") for m in ran])
    header = [h.replace("batch 1", f"batch 1, {threads} thread{'s' if threads != '1' else ''}") for h in HEADER]
    rows = [original_row(ran)] + [row(m) for m in methods]
    lines += settings_lines(ran) + [""]
    meta = ran[0].report["models"]["original"]["meta"]
    source = Path(str(meta.get("source", ""))).name
    note = "; ".join(x for x in (meta.get("note"), f"source `{source}`" if source else "") if x)
    if note:
        lines += [f"Original: {note}.", ""]
    lines += [_table(header, rows), ""]
    lines += ["Size: weight files of the model folder (MiB = 2^20 bytes). Perplexity and accuracy changes: the "
              "report's wording (relative % for perplexity, points for accuracy, \"within noise\" when smaller than "
              "1.96 combined standard errors). Decode speed ratio: compressed vs original in the same run. Pruned "
              "models store their zeros dense (no size or CPU speed change by design).", ""]
    missing = [m for m in methods if m.report is None]
    if missing:
        lines += ["Rows without figures (see the row for why): " + ", ".join(m.method for m in missing) + ".", ""]
    also = [f"{m.method} also has {', '.join(m.also)} (not used)" for m in methods if m.also]
    if also:
        lines += ["One recipe per method: " + "; ".join(also) + ".", ""]
    lines += ["## Reading the table", "", *[f"- {f}" for f in facts(methods)], ""]
    lines += ["## Runs", "", runs_table(methods), "",
              "Stage times as each stage recorded them (a resumed stage keeps the time of the run that made it).", ""]
    return "\n".join(lines)


def build(recipes_dir: Path, runs_dir: Path, only: list[str] | None = None, run: bool = False,
          lock: Path | None = None, model: str = DEFAULT_MODEL) -> tuple[str, list[MethodRun]]:
    """Discover, optionally run, load and render. Returns ``(markdown, methods)``."""
    methods = discover(recipes_dir, runs_dir, model)
    for m in methods:
        if m.name:
            check_runnable(m)
    if run:
        picked = [m for m in methods if m.name and (not only or m.name in only or m.method in only)]
        if only:  # in the order given
            picked.sort(key=lambda m: min(only.index(k) for k in (m.name, m.method) if k in only))
        for m in picked:
            if m.blocked:
                print(f"[methods_table] {m.name}: skipped, {m.blocked}", flush=True)
                continue
            run_recipe_cli(m, lock)
    load_runs(methods)
    methods.sort(key=sort_key)
    return render(methods, model), methods


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run the method recipes first (finished stages are reused)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="with --run: only these recipe or method names")
    p.add_argument("--lock", type=Path, help="with --run: hold an flock on this file during each run "
                   "(serializes heavy jobs with others on a shared machine)")
    p.add_argument("--recipes", type=Path, default=ROOT / "recipes", help="recipes folder (default: recipes/)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "methods", help="run folders (default: runs/methods/)")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "methods.md", help="default: docs/methods.md")
    args = p.parse_args(argv)
    text, methods = build(args.recipes, args.runs, args.only, args.run, args.lock)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    old = args.output.read_text() if args.output.is_file() else ""
    begin, end = "<!-- ladder:begin -->", "<!-- ladder:end -->"  # bench/ladder.py's section is kept as it is
    if begin in old and end in old:
        text = text.rstrip() + "\n\n" + old[old.index(begin): old.index(end) + len(end)] + "\n"
    args.output.write_text(text)
    done = sum(m.report is not None for m in methods)
    print(f"[methods_table] wrote {args.output} ({done} of {len(methods)} methods with figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
