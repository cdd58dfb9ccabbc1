"""``run_sweep``: expand and validate every recipe, skip the finished ones, run the rest on an executor, and write
the sweep folder::

    runs/sweeps/<name>/
      runs/<recipe name>/      one run folder per recipe (report.json, report.md, model folders, logs/)
      leaderboard.csv  leaderboard.md  pareto.png
      sweep.json               the sweep as resolved, every outcome (with its report), rows and recommendations
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.markup import escape

from .. import rundir
from ..errors import RecipeError
from ..utils.io import atomic_write_json, atomic_write_text, read_json
from .executors import EXECUTORS
from .board import LEADERBOARD_CSV, LEADERBOARD_MD, PARETO_PNG, build_rows, render_markdown, write_csv, write_pareto
from .config import LocalExecutorConfig, RayExecutorConfig, SweepConfig, load_sweep
from .expand import Point, expand, yaml_value
from .recommend import recommend
from .worker import finished_report

SWEEP_JSON, RUNS_DIR = "sweep.json", "runs"
#: What a sweep writes at the top of its folder (``--fresh`` and the output check go by it).
def _sweep_owned(path: Path) -> bool:
    """Our sweep.json; or, before the first recipe finished, a `runs/` folder holding run folders only."""
    try:
        saved = read_json(path / SWEEP_JSON)
        return isinstance(saved, dict) and saved.get("format") == "llmcompress-sweep"
    except (OSError, ValueError):
        pass
    runs = path / RUNS_DIR
    others = [p for p in path.iterdir() if p.name != RUNS_DIR and p.name != rundir.LOCK]
    return runs.is_dir() and not others and all(rundir.is_ours(p) for p in runs.iterdir())


SWEEP_FOLDER = rundir.FolderKind("sweep", SWEEP_JSON, (SWEEP_JSON, RUNS_DIR, LEADERBOARD_CSV, LEADERBOARD_MD,
                                                       PARETO_PNG), _sweep_owned)


def resolve_executor(sweep: SweepConfig, executor: str | None = None, address: str | None = None) -> Any:
    """The executor config: the sweep file's, with the command line's ``--executor`` / ``--address`` on top."""
    cfg = sweep.executor
    if executor is not None:
        EXECUTORS.get(executor)  # an unknown name raises the did-you-mean error
    if address is not None:
        if executor not in (None, "ray"):
            raise RecipeError(f"--address {address} needs --executor ray (--executor {executor} runs on this "
                              "machine). Fix: drop --address, or use --executor ray")
        executor = "ray"
    if executor is None or executor == cfg.type:
        # validated again (model_copy would plant the value unchecked)
        return type(cfg).model_validate({**cfg.model_dump(), "address": address}) if address is not None else cfg
    if executor == "local":
        return LocalExecutorConfig()
    if executor == "ray":
        return RayExecutorConfig(address=address)
    EXECUTORS.get(executor)  # unknown name: did-you-mean error
    raise RecipeError(f"--executor {executor}: no config for it")  # pragma: no cover - every entry is handled above


def run_sweep(path: str | Path, output: str | Path | None = None, *, executor: str | None = None,
              address: str | None = None, fresh: bool = False, console: Any = None, show_progress: bool = True,
              dry_run: bool = False, wait: bool = False) -> dict:
    """Run a sweep file; returns what ``sweep.json`` holds. RecipeError (before anything runs) for bad input.

    One sweep at a time per folder: another raises LLMCompressError, or with ``wait=True`` this one waits."""
    from rich.console import Console

    console = console or Console(stderr=True)
    path = Path(path)
    sweep = load_sweep(path)
    ex_cfg = resolve_executor(sweep, executor, address)
    executor_cls = EXECUTORS.get(ex_cfg.type)
    if not dry_run and hasattr(executor_cls, "preflight"):
        executor_cls.preflight()  # a missing extra (ray) stops the sweep before anything is expanded or written
    remote = ex_cfg.type == "ray" and not ex_cfg.local
    points = expand(sweep, path, preflight=not remote)  # a remote cluster's workers check their own environment
    out = Path(output) if output else Path("runs") / "sweeps" / sweep.name
    _print_plan(console, sweep, points, out, ex_cfg)
    if dry_run:
        return {"name": sweep.name, "points": [_point_entry(p) for p in points]}
    rundir.check_output(out, fresh, SWEEP_FOLDER)
    out.mkdir(parents=True, exist_ok=True)
    with rundir.locked(out, wait, on_wait=lambda who: console.log(f"waiting for the other sweep: {who}"),
                       what="sweep"):
        return _run_locked(sweep, path, points, out, fresh, ex_cfg, executor_cls, console, show_progress)


def _run_locked(sweep: SweepConfig, path: Path, points: list[Point], out: Path, fresh: bool, ex_cfg: Any,
                executor_cls: Any, console: Any, show_progress: bool) -> dict:
    started, t0 = _now(), time.perf_counter()
    outcomes, jobs = _plan(points, out, fresh)
    resumed = sum(o["status"] == "resumed" for o in outcomes.values())
    if resumed:
        console.log(f"{resumed} recipe(s) finished earlier: skipped (resume)")
    runner = executor_cls(ex_cfg, console, show_progress=show_progress)
    state = {"sweep": sweep, "path": path, "points": points, "out": out, "outcomes": outcomes, "started": started,
             "t0": t0, "executor": runner}

    def on_done(outcome: dict) -> None:
        _keep_report(outcome)
        outcomes[outcome["name"]] = outcome
        ok = outcome["status"] == "done"
        console.log(f"[{'green' if ok else 'red'}]{escape(outcome['name'])}: {outcome['status']}[/] in "
                    f"{outcome.get('seconds', 0):.0f}s" + ("" if ok else f" — {escape(str(outcome.get('error')))}"))
        _write(state, final=False)

    try:
        if jobs:
            runner.run(jobs, on_done)
    finally:
        summary = _write(state, final=True)
    _print_result(console, summary, out)
    return summary


def _previous(out: Path) -> dict[str, dict]:
    """How each recipe ran last time (host, attempts, seconds), from the sweep.json an earlier run left."""
    try:
        saved = read_json(out / SWEEP_JSON)
    except (OSError, ValueError):
        return {}
    keep = ("host", "attempts", "seconds")
    outcomes = saved.get("outcomes") if isinstance(saved, dict) else None
    return {o["name"]: {k: o[k] for k in keep if o.get(k) is not None} for o in outcomes or []
            if isinstance(o, dict) and isinstance(o.get("name"), str) and o.get("status") in ("done", "resumed")}


def _plan(points: list[Point], out: Path, fresh: bool) -> tuple[dict[str, dict], list[dict]]:
    """Outcomes known before running (skipped as invalid, finished earlier) and the jobs left to run."""
    before = {} if fresh else _previous(out)
    outcomes: dict[str, dict] = {}
    jobs = []
    for p in points:
        run_dir = (out / RUNS_DIR / p.name).resolve()
        if not p.valid:
            outcomes[p.name] = {"name": p.name, "status": "skipped", "error": p.error, "run_dir": None}
            continue
        if fresh and run_dir.exists():
            rundir.check_output(run_dir, fresh=True)
            with rundir.locked(run_dir):  # a run of it still going (started by hand) refuses
                rundir.clear(run_dir)
        report = finished_report(run_dir, p.recipe.model_dump(mode="json", exclude_none=True))
        if report is not None:  # exactly this recipe finished here earlier: nothing is loaded
            outcomes[p.name] = {"name": p.name, "status": "resumed", "report": report, "run_dir": str(run_dir),
                                "seconds": (report.get("environment") or {}).get("seconds"), **before.get(p.name, {})}
            continue
        origin = str(p.recipe.path) if p.recipe.path else None
        jobs.append({"name": p.name, "raw": p.raw, "origin": origin, "run_dir": str(run_dir)})
    return outcomes, jobs


def _keep_report(outcome: dict) -> None:
    """A run on another node without a shared folder: keep the gathered report where the sweep looks for it."""
    report, run_dir = outcome.get("report"), outcome.get("run_dir")
    if report and run_dir and not (Path(run_dir) / "report.json").is_file():
        atomic_write_json(Path(run_dir) / "report.json", {**report, "gathered_from": outcome.get("host")})


def _write(state: dict, final: bool) -> dict:
    """sweep.json, leaderboard.csv/.md and pareto.png from the outcomes so far (rewritten as each recipe ends)."""
    sweep: SweepConfig = state["sweep"]
    out: Path = state["out"]
    points: list[Point] = state["points"]
    ordered = [{**state["outcomes"][p.name], "overrides": p.overrides, "source": p.source}
               for p in points if p.name in state["outcomes"]]
    rows = build_rows(ordered, sweep.sort_by)
    finished = [r for r in rows if r.get("status") in ("done", "resumed")]
    recs = [recommend(rule, finished) for rule in sweep.recommend]
    picked = {r["pick"] for r in recs if r["pick"]}
    for row in rows:
        row["recommended"] = row["name"] in picked
    summary = _summary(state, ordered, rows, recs, final)
    write_csv(rows, out / LEADERBOARD_CSV)
    plot = write_pareto(rows, out / PARETO_PNG, caption=_caption(summary))
    atomic_write_text(out / LEADERBOARD_MD, render_markdown(summary, rows, recs, PARETO_PNG if plot else None))
    if sweep.markdown:
        from .methods import render, write  # the methods table (docs/methods.md's shape)

        page = Path(sweep.markdown).expanduser()
        page = page if page.is_absolute() else state["path"].parent / page
        write(page, render({**summary, "rows": rows, "outcomes": ordered}, points, page))
    atomic_write_json(out / SWEEP_JSON, {**summary, "rows": rows, "recommendations": recs,
                                         "outcomes": ordered})
    return {**summary, "rows": rows, "recommendations": recs, "outcomes": ordered}


def _summary(state: dict, ordered: list[dict], rows: list[dict], recs: list[dict], final: bool) -> dict:
    sweep: SweepConfig = state["sweep"]
    counts = {"points": len(state["points"]), **{k: sum(o["status"] == k for o in ordered)
                                                for k in ("done", "resumed", "failed", "skipped")}}
    counts["pending"] = counts["points"] - len(ordered)
    reports = [o["report"] for o in ordered if o.get("report")]
    return {
        "format": "llmcompress-sweep", "version": 1, "name": sweep.name, "file": str(state["path"]),
        "base": _base_path(sweep, state["path"]),
        "set": [f"{k}={yaml_value(v)}" for k, v in sweep.set_.items()],
        "sweep": sweep.model_dump(mode="json", by_alias=True), "executor": state["executor"].describe(),
        "started": state["started"], "finished": _now() if final else None,
        "seconds": round(time.perf_counter() - state["t0"], 1), "counts": counts,
        "measured": _measured(reports), "baseline": _baseline_use(reports),
        "points": [_point_entry(p) for p in state["points"]],
    }


def _base_path(sweep: SweepConfig, path: Path) -> str | None:
    """The base recipe file as a user in the current folder would type it (None for an inline base)."""
    if not isinstance(sweep.base, str):
        return None
    base = Path(sweep.base).expanduser()
    base = (base if base.is_absolute() else path.parent / base).resolve()
    return str(base.relative_to(Path.cwd())) if base.is_relative_to(Path.cwd()) else str(base)


def _point_entry(p: Point) -> dict:
    return {"index": p.index, "name": p.name, "source": p.source, "overrides": p.overrides, "valid": p.valid,
            "error": p.error}


def _measured(reports: list[dict]) -> dict:
    """How the first finished run measured quality and speed (the leaderboard states it once)."""
    if not reports:
        return {}
    cmp = reports[0].get("comparison") or {}
    drop = ("stage", "notes")

    def clean(d: dict | None) -> dict | None:
        return {k: v for k, v in d.items() if k not in drop and "fingerprint" not in k} if d else None

    return {"eval": clean((cmp.get("eval") or {}).get("measured_with")),
            "bench": clean((cmp.get("bench") or {}).get("measured_with"))}


def _baseline_use(reports: list[dict]) -> dict:
    """How often the original's evaluation was computed vs taken from the cache, over the runs' evaluate stages."""
    computed = reused = 0
    for report in reports:
        for stage in report.get("stages") or []:
            cached = ((stage.get("data") or {}).get("timing") or {}).get("original", {}).get("cached")
            if stage.get("type") == "evaluate" and cached is not None:
                computed, reused = computed + (not cached), reused + bool(cached)
    return {"runs": computed + reused, "computed": computed, "reused": reused}


def _caption(summary: dict) -> str:
    ev = (summary.get("measured") or {}).get("eval") or {}
    from ..report import metrics as M

    return f"sweep {summary['name']}: {summary['counts']['points']} recipes; {M.conditions_text(ev)}"


def _print_plan(console: Any, sweep: SweepConfig, points: list[Point], out: Path, ex_cfg: Any) -> None:
    from rich.table import Table

    table = Table(title=f"sweep {sweep.name}: {len(points)} recipes -> {out} ({ex_cfg.type} executor)")
    for col in ("#", "recipe", "overrides", "status"):
        table.add_column(col)
    for p in points:
        table.add_row(str(p.index), p.name, " ".join(p.overrides) or "(base)",
                      "ok" if p.valid else f"[yellow]skipped[/yellow]: {escape(str(p.error))}")
    console.print(table)


def _print_result(console: Any, summary: dict, out: Path) -> None:
    from rich.table import Table

    from ..report.leaderboard import format_cell

    table = Table(title=f"leaderboard: {out / LEADERBOARD_MD}")
    for col in ("", "run", "size", "quality recovery", "speedup", "status"):
        table.add_column(col)
    for r in summary["rows"]:
        table.add_row("★" if r.get("pareto") else "", str(r["name"]), format_cell("size_bytes", r.get("size_bytes")),
                      format_cell("quality_recovery", r.get("quality_recovery")),
                      format_cell("speedup", r.get("speedup")), str(r.get("status")))
    console.print(table)
    for rec in summary["recommendations"]:
        console.print(f"recommended ({rec['rule']}): {rec['pick'] or 'none'} — {rec['why']}", highlight=False)
    c = summary["counts"]
    console.print(f"{c['done']} ran, {c['resumed']} resumed, {c['failed']} failed, {c['skipped']} skipped in "
                  f"{summary['seconds']:.0f} s; {out / SWEEP_JSON}", highlight=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
