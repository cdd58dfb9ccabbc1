"""What a run costs as models grow: wall time and peak memory of each stage against parameter count, with a fitted
line per stage, so a user can read what a 7B or 70B run will cost before starting it.

    python benchmarks/scaling.py                 # every job below (about 30 minutes on 2 cores), then the docs
    python benchmarks/scaling.py --only nf4      # jobs whose name starts with nf4
    python benchmarks/scaling.py --docs          # regenerate docs/scaling.md and the package's fit from the results
    python benchmarks/scaling.py --only nf4-1.7b --memory-limit 1.5   # inside a memory cgroup of 1.5x the bf16 size

Models are random-weight llamas of real shapes (benchmarks/scaling_models.py): quality is meaningless, cost is real.
Shapes too large for this machine keep their layer shape with fewer layers; the line is fitted on parameter count,
so they extend the range without a 70B on disk. Every job runs `llmcompress run` in a fresh process (nothing shared
between jobs) and reads each stage's seconds and peak resident memory (VmHWM, reset per stage) from its
result.json. Results are written after each job (benchmarks/results/scaling.json; an interrupted run keeps them); the
fitted lines go to docs/scaling.md and to llmcompress/data/scaling.json, which `llmcompress validate` reads.

Resident memory counts the pages of memory-mapped weight files, which the kernel can take back when memory runs
short. ``--memory-limit F`` answers what a run really needs: the job runs inside a memory cgroup (v1 or v2; needs
write access to /sys/fs/cgroup, as root in a container) limited to F times the model's bf16 size, page cache
included (the page cache is dropped first, so the files the job reads are charged to it), and records whether it
completed, and the most memory the cgroup held (at the limit: the kernel reclaimed to stay under it). Those runs
are listed apart and not fitted.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling_models import SHAPES, build, param_count  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results" / "scaling.json"
FIT = ROOT / "llmcompress" / "data" / "scaling.json"
DOC = ROOT / "docs" / "scaling.md"
WORK = Path(os.environ.get("SCALING_WORK", "/tmp/llmcompress-scaling"))

EVAL = {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 1024}}
BENCH = {"type": "benchmark", "batch_sizes": [1], "new_tokens": 8, "repeats": 2}
PIPELINES = {
    "nf4": [{"type": "quantize", "method": "bnb-nf4"}, EVAL, BENCH],
    "rtn": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 64}],
    "hqq": [{"type": "quantize", "method": "hqq", "bits": 4, "group_size": 64}],
    "gptq": [{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
              "calibration": {"source": "builtin:pydoc", "samples": 16, "seq_len": 256}}],
    "lora": [{"type": "quantize", "method": "bnb-nf4"},
             {"type": "lora", "objective": "distill", "r": 16, "steps": 4, "batch_size": 2, "merge": "requantize",
              "data": {"source": "builtin:pydoc", "samples": 8, "seq_len": 128}}],
}
#: (pipeline, shape, layers or None for the real depth)
JOBS = [(p, s, None) for p in ("nf4", "rtn", "hqq", "gptq", "lora") for s in ("135m", "360m")]
JOBS += [(p, "1.7b", None) for p in ("nf4", "rtn", "hqq", "gptq", "lora")] + [("gptq", "1.7b", 8), ("nf4", "8b", 2)]

app = typer.Typer(add_completion=False)


def job_name(pipeline: str, shape: str, layers: int | None) -> str:
    return f"{pipeline}-{shape}" + (f"-{layers}l" if layers else "")


def model_dir(shape: str, layers: int | None) -> Path:
    path = WORK / "models" / (shape + (f"-{layers}l" if layers else ""))
    if not (path / "config.json").is_file():
        build(shape, path, layers)
    return path


def memory_cgroup(limit: int) -> Path:
    """A new memory cgroup limited to ``limit`` bytes (swap included where the kernel counts it); returns its
    folder, whose ``cgroup.procs`` a process writes its pid to to join."""
    root = Path("/sys/fs/cgroup")
    v1 = root / "memory"
    group = (v1 if (v1 / "memory.limit_in_bytes").exists() else root) / f"llmcompress-scaling-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        if group.parent == v1:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (group / "memory.max").write_text(str(limit))
            if (group / "memory.swap.max").exists():
                (group / "memory.swap.max").write_text("0")
    except OSError as e:
        raise SystemExit(f"--memory-limit needs a writable memory cgroup under {root} ({e}). Run as root, or "
                         "without --memory-limit.") from None
    return group


def charged_peak(group: Path) -> int | None:
    """The most memory the cgroup held at once, page cache included (v1 ``memory.max_usage_in_bytes``, v2
    ``memory.peak``); at the limit, the kernel reclaimed to stay under it. (v1's ``memory.failcnt`` stayed 0 here
    even for a process the limit killed.)"""
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if (group / name).exists():
            return int((group / name).read_text())
    return None


def run_job(pipeline: str, shape: str, layers: int | None, threads: int, limit_factor: float | None = None) -> dict:
    name = job_name(pipeline, shape, layers)
    params = param_count(SHAPES[shape], layers)
    group = memory_cgroup(int(limit_factor * 2 * params)) if limit_factor else None
    if group:  # page cache charged to other groups would not count against this one: start from an empty cache
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1")
        except OSError as e:
            group.rmdir()
            raise SystemExit(f"--memory-limit needs to drop the page cache first ({e}). Run as root.") from None
    recipe = {"name": f"scaling-{name}", "model": str(model_dir(shape, layers)), "threads": threads,
              "stages": PIPELINES[pipeline]}
    out = WORK / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out.parent / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    try:
        proc = subprocess.run([sys.executable, "-m", "llmcompress.cli", "run", str(out.parent / f"{name}.yaml"),
                               "-o", str(out), "--fresh"], capture_output=True, text=True, env=env, preexec_fn=join)
    finally:
        charged = charged_peak(group) if group else None
        if group:
            group.rmdir()
    wall = time.perf_counter() - t0
    limited = {"limit_factor": limit_factor, "limit_bytes": int(limit_factor * 2 * params),
               "charged_peak_bytes": charged} if group else {}
    if proc.returncode != 0:
        why = "killed (out of memory)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        unfinished = [d.name for d in sorted(out.glob("[0-9][0-9]-*")) if not (d / "result.json").is_file()]
        why += f" in stage {unfinished[0]}" if unfinished else ""
        return {"job": name, **limited, "error": [why, *proc.stderr.strip().splitlines()[-5:]]}
    stages = []
    for f in sorted(out.glob("*/result.json")):
        r = json.loads(f.read_text())["result"]
        label = r["type"] if r["type"] != "quantize" else f"quantize:{r['data']['method']}"
        stages.append({"stage": label, "seconds": r["seconds"], "peak_rss_bytes": r.get("peak_rss_bytes")})
    return {"job": name, **limited, "pipeline": pipeline, "shape": shape,
            "layers": layers or SHAPES[shape]["num_hidden_layers"],
            "params": params, "bf16_bytes": 2 * params, "wall_s": round(wall, 1),
            "load_avg": [load0, os.getloadavg()[0]],
            "stages": stages, "run_peak_rss_bytes": max(s["peak_rss_bytes"] or 0 for s in stages)}


def machine() -> dict:
    from llmcompress.llamacpp.runtime import isa_flags
    from llmcompress.utils.memory import machine_memory

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    return {"cpu": model, "cores": os.cpu_count(), "flags": isa_flags(),
            "memory_bytes": (machine_memory() or {}).get("total"), "python": platform.python_version()}


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(intercept, slope)`` of y on x (None with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def fits(results: list[dict]) -> dict:
    """Per stage label: fitted ``peak_rss_bytes`` and ``seconds`` against parameters, and the points they came from."""
    by_stage: dict[str, list[tuple[int, dict]]] = {}
    for r in results:
        if r.get("limit_factor"):  # within a memory limit: reclaim changes the figures; listed apart
            continue
        for s in r.get("stages", []):
            by_stage.setdefault(s["stage"], []).append((r["params"], s))
    out = {}
    for stage, pts in sorted(by_stage.items()):
        peak = fit([(p, s["peak_rss_bytes"]) for p, s in pts if s["peak_rss_bytes"]])
        secs = fit([(p, s["seconds"]) for p, s in pts])
        if peak is None:
            continue
        out[stage] = {"peak_rss_bytes": [round(peak[0]), round(peak[1], 4)],
                      "seconds": [round(secs[0], 2), round(secs[1] * 1e9, 4) / 1e9] if secs else None,
                      "points": len(pts), "params_range": [min(p for p, _ in pts), max(p for p, _ in pts)]}
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def job_rows(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['job']} | | | failed: {' '.join(r['error'])[:200]} | | | | |")
            continue
        for s in r["stages"]:
            lines.append(f"| {r['job']} | {r['params'] / 1e9:.3f} B | {gib(r['bf16_bytes'])} | {s['stage']} | "
                         f"{s['seconds']:.1f} | {gib(s['peak_rss_bytes'])} | "
                         f"{s['peak_rss_bytes'] / r['bf16_bytes']:.2f}x | "
                         f"{r['load_avg'][0]:.1f} -> {r['load_avg'][1]:.1f} |")
    return lines


def write_docs(data: dict) -> None:
    lines = ["# What a run costs as models grow", "",
             "Generated by `python benchmarks/scaling.py` from `benchmarks/results/scaling.json`; do not edit by hand.",
             "",
             f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores "
             f"({', '.join(data['machine']['flags'])}), {gib(data['machine']['memory_bytes'])} memory, no GPU; "
             f"torch {data['threads']} threads; measured {data['date']}. The machine was shared (the load average "
             "before and after each job is listed: above 2, the job shared the 2 cores and its seconds are "
             "inflated).", "",
             "Models: random-weight llamas of real shapes (SmolLM2-135M, -360M, -1.7B; Llama-3-8B with 2 of its 32 "
             "layers): quality is meaningless, cost is real. Each job is one `llmcompress run` in a fresh process; "
             "peak memory is the run process's resident high-water mark (VmHWM) during the stage, reset at each "
             "stage; it counts the memory-mapped weight files the stage touched (page cache the kernel can reclaim), "
             "and not the processes a stage starts (the benchmark's fresh-process memory probe, servers).", "",
             "## Each job", "",
             "| job | parameters | bf16 size | stage | seconds | peak memory | peak / bf16 size | load average |",
             "|---|---|---|---|---|---|---|---|"]
    lines += job_rows([r for r in data["results"] if not r.get("limit_factor")])
    limited = [r for r in data["results"] if r.get("limit_factor")]
    if limited:
        lines += ["", "## Within a memory limit", "",
                  "`--memory-limit F`: the job ran inside a memory cgroup of F times the bf16 size, page cache "
                  "included, started with an empty page cache (the kernel reclaims mapped file pages to stay "
                  "under the limit). A job that completed needs no more memory than that. \"Charged peak\" is the "
                  "most the cgroup held at once (at the limit: the kernel had to reclaim); \"peak memory\" is "
                  "the stage's resident peak under the limit.", "",
                  "| job | limit | completed | charged peak | stage | seconds | peak memory | load average |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in limited:
            head = f"| {r['job']} | {r['limit_factor']}x = {gib(r['limit_bytes'])} |"
            if "error" in r:
                lines.append(f"{head} no: {' '.join(r['error'])[:200]} | | | | | |")
                continue
            for s in r["stages"]:
                lines.append(f"{head} yes | {gib(r['charged_peak_bytes'] or 0)} | {s['stage']} | {s['seconds']:.1f} | "
                             f"{gib(s['peak_rss_bytes'])} | {r['load_avg'][0]:.1f} -> {r['load_avg'][1]:.1f} |")
    lines += ["", "## Fitted lines and what they predict", "",
              "Least squares over the jobs above: peak = a + b x parameters, seconds = c + d x parameters. "
              "The seconds are this machine's (2 cores); scale them by your machine's speed. Beyond the measured "
              "range the lines are extrapolations.", "",
              "| stage | peak memory: a + b bytes per parameter | seconds: c + d per billion parameters "
              "| 8B: peak, time | 70B: peak, time |",
              "|---|---|---|---|---|"]
    for stage, f in data["fits"].items():
        a, b = f["peak_rss_bytes"]
        c, d = f["seconds"] or (0, 0)
        pred = [(a + b * n, c + d * n) for n in (8.03e9, 70.55e9)]
        lines.append(f"| {stage} | {gib(a)} + {b:.2f} B | {c:.0f} s + {d * 1e9:.0f} s | "
                     f"{gib(pred[0][0])}, {pred[0][1] / 60:.0f} min | {gib(pred[1][0])}, {pred[1][1] / 3600:.1f} h |")
    lines += ["", "`llmcompress validate RECIPE` prints this estimate for the recipe's model and refuses a run whose "
              "estimated peak exceeds the machine's memory (`memory_check: false` in the recipe runs it anyway).", ""]
    extra = DOC.with_name("scaling-notes.md")
    if extra.is_file():
        lines += [extra.read_text().rstrip(), ""]
    DOC.write_text("\n".join(lines))


def save(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    data["fits"] = fits(data["results"])
    FIT.write_text(json.dumps({"source": "benchmarks/scaling.py", "date": data["date"], "machine": data["machine"],
                               "threads": data["threads"], "stages": data["fits"]}, indent=1) + "\n")
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    write_docs(data)


@app.command()
def main(only: str = typer.Option("", help="comma-separated job names, or prefixes of job names"),
         threads: int = typer.Option(2), docs: bool = typer.Option(False, help="only regenerate the docs"),
         memory_limit: float = typer.Option(0.0, help="run inside a memory cgroup of this many times the bf16 "
                                            "size (0: no limit)")) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"results": []}
    data.update(machine=machine(), threads=threads, date=time.strftime("%Y-%m-%d"))
    if not docs:
        wanted = [p for p in only.split(",") if p]
        names = {job_name(*job) for job in JOBS}
        for pipeline, shape, layers in JOBS:
            name = job_name(pipeline, shape, layers)
            # a whole job name selects that job alone ("gptq-1.7b", not "gptq-1.7b-8l"); anything else is a prefix
            if wanted and not any(name == p or (p not in names and name.startswith(p)) for p in wanted):
                continue
            print(f"{name} ...", flush=True)
            result = run_job(pipeline, shape, layers, threads, memory_limit or None)
            if RESULTS.is_file():  # what other invocations saved meanwhile
                data["results"] = json.loads(RESULTS.read_text())["results"]
            same = (name, result.get("limit_factor"))
            data["results"] = [r for r in data["results"] if (r["job"], r.get("limit_factor")) != same] + [result]
            print(json.dumps(result)[:400], flush=True)
            save(data)
    save(data)


if __name__ == "__main__":
    app()
