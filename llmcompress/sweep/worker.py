"""One recipe of a sweep, run where an executor puts it (this process, a Ray worker), returning a plain-JSON outcome.

A job is a plain dict (it crosses process and machine boundaries)::

    {"name", "raw": recipe mapping, "origin": file relative paths resolve against, "run_dir"}

A job always resumes its run folder from its last finished stage (``sweep --fresh`` clears the folders before any
job starts). The outcome: ``{"name", "status": "done"|"failed", "error", "error_kind": "input"|"runtime", "seconds",
"host", "report"}``. ``input`` errors (a bad recipe, a missing extra: LLMCompressError) are the user's to fix and are
not retried; anything else (a crash, out of memory, ``RunCrashed``: a training subprocess that died) is ``runtime``
and retried per the executor's policy.
"""

from __future__ import annotations

import platform
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import LLMCompressError, RunCrashed
from ..utils.io import read_json

SWEEP_LOG = "logs/sweep.log"  # inside each run folder: the run's console output when it runs unattended


def finished_report(run_dir: str | Path, recipe_dump: dict) -> dict | None:
    """The report of a finished run of exactly this recipe in ``run_dir``, else None (no model is loaded)."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        return None
    try:
        report = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("recipe") != recipe_dump:
        return None
    from ..rundir import run_problem

    return None if run_problem(Path(run_dir)) else report  # a deleted or truncated model: run it (it resumes)


def run_point(job: dict, console: Any = None, show_progress: bool = False) -> dict:
    """Run one job; never raises for a failed recipe (the sweep goes on), only for KeyboardInterrupt."""
    from ..pipeline import run_recipe
    from ..recipe import load_recipe

    t0 = time.perf_counter()
    out: dict[str, Any] = {"name": job["name"], "run_dir": job["run_dir"], "host": platform.node()}
    log_file = None
    try:
        if console is None:
            from rich.console import Console

            from .. import rundir

            rundir.check_output(Path(job["run_dir"]), fresh=False)  # then mark it ours before the log goes in
            Path(job["run_dir"]).mkdir(parents=True, exist_ok=True)
            rundir.start_manifest(Path(job["run_dir"]), job["name"])
            log = Path(job["run_dir"]) / SWEEP_LOG
            log.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed below
            console = Console(file=log_file, width=120, force_terminal=False)
        recipe = load_recipe(job["raw"], origin=job.get("origin"), where=f"recipe {job['name']}")
        report = run_recipe(recipe, job["run_dir"], console=console, show_progress=show_progress)
        out.update(status="done", report=report)
    except RunCrashed as e:  # not the user's input: retried like any other crash
        if console is not None:
            console.print(str(e), markup=False, highlight=False)
        out.update(status="failed", error=str(e)[:2000], error_kind="runtime")
    except LLMCompressError as e:
        out.update(status="failed", error=str(e), error_kind="input")
    except Exception as e:  # noqa: BLE001 - a crash in one recipe must not stop the sweep
        tb = traceback.format_exc()
        if console is not None:
            console.print(tb, markup=False, highlight=False)
        out.update(status="failed", error=f"{type(e).__name__}: {e}", error_kind="runtime", traceback=tb[-4000:])
    finally:
        if log_file is not None:
            log_file.close()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
