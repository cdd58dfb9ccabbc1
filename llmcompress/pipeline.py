"""The runner: one recipe -> one run folder, stage by stage, resumable, with a report at the end.

Run folder layout::

    runs/<name>/
      recipe.resolved.yaml     the recipe as validated (defaults filled in)
      manifest.json            stage fingerprints and status
      01-quantize/             one folder per stage: result.json (+ model/ when the stage changes the model)
      02-evaluate/
      report.json  report.md  plots/

A stage counts as finished only when its ``result.json`` exists and its fingerprint (model + all stage configs up to
it) matches; everything is written to a temporary name first and renamed, so a killed run never leaves an artifact
that a later run trusts.
"""

from __future__ import annotations

import gc
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import rundir
from .errors import LLMCompressError
from .recipe import Recipe, load_recipe
from .stage import STAGES, StageConfig, StageResult
from .utils.io import atomic_write_json, atomic_write_text, read_json, stable_hash
from .utils.liblogs import libraries_log_to
from .utils.memory import cuda_peak_bytes, peak_rss_bytes, reset_peak, trim

RESULT = "result.json"


def preflight(recipe: Recipe) -> Any:
    """Everything that can be checked before weights load: the model reference, extras, hardware, and whether the
    run's estimated peak memory fits this machine. Returns that estimate (``estimate.Estimate``, None when the
    model's size cannot be read before a download)."""
    from .models import resolve_source
    from .models.source import check_source

    try:
        source = resolve_source(recipe.model, recipe.base_dir)
        check_source(source)
    except LLMCompressError as e:
        raise _located(e, _where(recipe)) from None
    # A local folder's config.json tells what it is: stages that only take some architectures say so now.
    folder = Path(source.ref) if source.kind == "folder" and not source.spec.gguf_file else None
    from .models.kind import check_kind

    # recipes built in Python; hub models by their config.json
    check_kind(recipe.model, recipe.stages, recipe.base_dir, _where(recipe), hub=True)
    if source.kind == "builtin":
        from .models.source import materialize

        folder = materialize(source)  # built once and cached; check_memory reads it too
    for i, stage in enumerate(recipe.stages):
        try:
            stage.preflight(recipe.base_dir)
            if folder is not None:  # its config.json describes the model this stage gets
                stage.check_model(folder)
        except LLMCompressError as e:
            raise _located(e, f"{_where(recipe)}: stages[{i}] ({stage.kind})") from None
        if stage.reshapes_model:
            folder = None
    return check_memory(recipe, source)


def check_memory(recipe: Recipe, source: Any) -> Any:
    """The run's cost estimate (``estimate.py``); refuses one whose estimated peak exceeds this machine's memory."""
    from .context import auto_dtype
    from .estimate import estimate
    from .errors import RecipeError
    from .models.source import materialize

    if source.kind == "hub":
        return None  # its size is known only once downloaded
    if source.kind == "builtin":
        folder = materialize(source)  # built once and cached (the default model: a few seconds the first time)
    elif source.kind == "folder" and source.spec.gguf_file:
        folder = Path(source.ref) / source.spec.gguf_file
    else:
        folder = Path(source.ref)  # a folder, or a .gguf file read without converting it
    dtype = recipe.dtype if recipe.dtype != "auto" else auto_dtype("cpu" if recipe.device != "cuda" else "cuda")
    est = estimate(recipe, folder, dtype)
    if est is None or est.fits() or not recipe.memory_check:
        return est
    from .report.metrics import fmt_bytes

    worst = max((s for s in est.stages if s.peak_bytes is not None), key=lambda s: s.peak_bytes)
    raise RecipeError(
        f"{_where(recipe)}: this run would peak at about {fmt_bytes(est.peak_bytes)} of memory (its {worst.stage} "
        f"stage, for {est.params / 1e9:.2f} B parameters in {dtype}; lines measured by benchmarks/scaling.py, see "
        f"docs/scaling.md), and this machine has {fmt_bytes(est.machine_bytes)}. Fix: run it on a machine with "
        "more memory or compress a smaller model; or, if you know better than the estimate, set "
        "`memory_check: false` in the recipe.")


def _located(e: LLMCompressError, where: str) -> LLMCompressError:
    """Prefix the error with the place (recipe file, stage) unless it already names it. Stages do not say where."""
    if not str(e).startswith(where.split(":")[0]):
        e.args = (f"{where}: {e}",)
    return e


def _where(recipe: Recipe) -> str:
    return str(recipe.path) if recipe.path else f"recipe {recipe.name!r}"


def stage_dir_name(index: int, stage: StageConfig) -> str:
    return f"{index + 1:02d}-{stage.type}"


def fingerprints(recipe: Recipe, threads: int) -> list[str]:
    """One hash per stage over everything that can change its output: model, dtype, seed, threads, stages so far."""
    head = [recipe.model.model_dump(), recipe.dtype, recipe.device, recipe.seed, threads]
    # (an export's `push_to_hub` happens after the run and changes no output: left out, so adding it redoes nothing)
    configs = [s.model_dump(mode="json", exclude={"push_to_hub"}) for s in recipe.stages]
    return [stable_hash(head + configs[: i + 1]) for i in range(len(configs))]


def run_recipe(
    recipe: Recipe | str | Path,
    output: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    fresh: bool = False,
    console: Any = None,
    show_progress: bool = True,
    wait: bool = False,
) -> dict:
    """Run every stage of ``recipe`` into ``output`` (default ``runs/<name>``) and return the report dict.

    Finished stages of an earlier run into the same folder are skipped (``fresh=True`` starts over, removing only
    what a run wrote). One run at a time per folder: another one raises LLMCompressError, or with ``wait=True``
    this one waits for it.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply when loading: pass the recipe path, or call load_recipe(path, overrides)")
    preflight(recipe)

    from rich.console import Console

    console = console or Console(stderr=True)
    run_dir = Path(output) if output else Path("runs") / recipe.name
    rundir.check_output(run_dir, fresh)
    rundir.check_owner(run_dir, recipe.name, fresh)
    state: dict[str, Any] = {}  # what the run is doing, for a disk-full message: "needed" bytes, its "ctx"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with rundir.locked(run_dir, wait, on_wait=lambda who: console.log(f"waiting for the other run: {who}")):
            if fresh:
                removed = rundir.clear(run_dir)
                if removed:
                    console.log(f"--fresh: removed {', '.join(removed)} from {run_dir}")
            rundir.start_manifest(run_dir, recipe.name)
            atomic_write_text(run_dir / "recipe.resolved.yaml", recipe.to_yaml())
            return _run_locked(recipe, run_dir, console, show_progress, state)
    except LLMCompressError:
        raise
    except Exception as e:
        ctx = state.get("ctx")
        where = ctx.stage_dir if ctx is not None and ctx.stage_dir != Path() else run_dir
        problem = rundir.disk_error(e, where, state.get("needed"))
        if problem is None:
            raise
        raise problem from None


def _run_locked(recipe: Recipe, run_dir: Path, console: Any, show_progress: bool, state: dict) -> dict:
    started, t0 = _now(), time.perf_counter()
    with libraries_log_to(run_dir / "logs" / "libraries.log"), _progress(console, show_progress) as progress:
        ctx = state["ctx"] = _make_context(recipe, run_dir, console, progress)
        state["needed"] = _disk_needed(recipe, ctx.original.size_bytes)
        _warn_disk(console, run_dir, state["needed"])
        try:
            stages = _run_stages(ctx)
        finally:
            ctx.close_engines()
    return _finish(ctx, stages, {"started": started, "seconds": round(time.perf_counter() - t0, 1)})


def _disk_needed(recipe: Recipe, original_bytes: int) -> int:
    """An upper bound on what the run writes: a model the size of the original per stage that writes one."""
    copies = sum(1 for s in recipe.stages if s.changes_model or s.type == "export")
    return copies * original_bytes + 2**20  # + reports, plots, logs


def _warn_disk(console: Any, run_dir: Path, needed: int) -> None:
    from .report.metrics import fmt_bytes

    free = rundir.free_bytes(run_dir)
    if free < needed:
        console.log(f"[yellow]warning[/yellow]: {fmt_bytes(free)} free on the disk of {run_dir}; this run may "
                    f"write up to {fmt_bytes(needed)} (a model as large as the original per stage that writes one)")


def _progress(console: Any, enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True,
    )


def _make_context(recipe: Recipe, run_dir: Path, console: Any, progress: Any):
    from .context import ModelHandle, RunContext, Runtime
    from .models import resolve_source
    from .models.kind import run_family
    from .models.source import materialize

    runtime = Runtime.from_recipe(recipe)
    runtime.apply()
    source = resolve_source(recipe.model, recipe.base_dir)
    console.log(f"model {source.describe()} ({runtime.device}, {runtime.dtype}, {runtime.threads} thread(s))")
    t0 = time.perf_counter()
    path = materialize(source)
    if time.perf_counter() - t0 > 2:
        console.log(f"prepared {path} in {time.perf_counter() - t0:.1f}s (cached for later runs)")
    kwargs = {}
    if source.kind == "hub":
        kwargs = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code}
    original = ModelHandle("original", path, runtime, load_kwargs=kwargs)
    return RunContext(recipe=recipe, run_dir=run_dir, runtime=runtime, original=original, current=original,
                      console=console, progress=progress, family_task=run_family(recipe.model, path))


def _run_stages(ctx) -> list[dict]:
    recipe = ctx.recipe
    prints = fingerprints(recipe, ctx.runtime.threads)
    manifest: dict[str, Any] = {"llmcompress": rundir.FORMAT, "recipe": recipe.name, "stages": []}
    stages: list[dict] = []
    rerun_from_here = False
    n = len(recipe.stages)
    for i, stage in enumerate(recipe.stages):
        ctx.stage_index = i
        ctx.stage_dir = ctx.run_dir / stage_dir_name(i, stage)
        ctx.fingerprint = prints[i]
        header = f"[{i + 1}/{n}] {stage.label}"
        saved, why = (None, None) if rerun_from_here else _finished(ctx.stage_dir, prints[i])
        if saved is not None:
            result, resumed = StageResult.model_validate(saved["result"]), True
            ctx.console.log(f"{header}: finished earlier, skipped (resume)")
        else:
            if why:
                ctx.console.log(f"{header}: finished earlier, but {why}: running it again")
            rerun_from_here = True
            saved = _run_one(ctx, stage, prints[i], header)
            result, resumed = StageResult.model_validate(saved["result"]), False
        if result.model_dir:
            ctx.set_current(ctx.stage_dir / result.model_dir)
        ctx.results[i] = result
        entry = {"index": i, "dir": ctx.stage_dir.name, "config": stage.model_dump(mode="json", exclude_none=True),
                 "result": result.model_dump(mode="json"), "resumed": resumed}
        stages.append(entry)
        manifest["stages"].append({"index": i, "dir": ctx.stage_dir.name, "fingerprint": prints[i], "status": "done",
                                   "outputs": saved.get("outputs")})
        atomic_write_json(ctx.run_dir / rundir.MANIFEST, manifest)
    return stages


def _finished(stage_dir: Path, fingerprint: str) -> tuple[dict | None, str | None]:
    """``(saved result.json, None)`` for a stage that finished with this fingerprint and whose outputs are still as
    it wrote them; else ``(None, why)`` (``why`` None when there is nothing to say: never run, or its config
    changed)."""
    f = stage_dir / RESULT
    if not f.is_file():
        return None, None
    try:
        saved = read_json(f)
        if saved.get("fingerprint") != fingerprint:
            return None, None
        result = StageResult.model_validate(saved["result"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        return None, f"its {RESULT} is unreadable"
    if result.model_dir and not (stage_dir / result.model_dir).resolve().is_relative_to(stage_dir.resolve()):
        return None, f"its {RESULT} points outside the stage folder"
    if result.model_dir and not (stage_dir / result.model_dir).is_dir():
        return None, f"its model folder {result.model_dir}/ is gone"
    if "outputs" in saved:
        problem = rundir.outputs_problem(stage_dir, saved["outputs"])
        if problem:
            return None, problem
    elif not all(Path(p).exists() for p in result.artifacts):  # written before outputs were recorded
        return None, "a file it wrote elsewhere is gone"
    return saved, None


def _run_one(ctx, stage: StageConfig, fingerprint: str, header: str) -> dict:
    if ctx.stage_dir.exists():
        shutil.rmtree(ctx.stage_dir)  # leftovers of a killed or outdated run: never trusted
    ctx.stage_dir.mkdir(parents=True)
    ctx.runtime.apply()
    ctx.console.log(f"{header} ...")
    gc.collect()
    trim()  # garbage of earlier stages is not this stage's peak
    reset_peak()
    t0 = time.perf_counter()
    try:
        result = stage.run(ctx)
    except LLMCompressError as e:
        raise _located(e, f"{_where(ctx.recipe)}: stages[{ctx.stage_index}] ({stage.kind})") from None
    result.seconds = round(time.perf_counter() - t0, 3)
    result.peak_rss_bytes, result.peak_gpu_bytes = peak_rss_bytes(), cuda_peak_bytes()
    saved = {"fingerprint": fingerprint, "config": stage.model_dump(mode="json"),
             "result": result.model_dump(mode="json"),
             "outputs": rundir.record_outputs(ctx.stage_dir, result.artifacts, skip=RESULT), "finished": _now()}
    atomic_write_json(ctx.stage_dir / RESULT, saved)
    _remove_checkpoints(ctx.checkpoint_dir)  # the stage is finished: what a killed run would have resumed from
    brief = ", ".join(f"{k} {v}" for k, v in result.summary.items())
    from .report.metrics import fmt_bytes

    ctx.console.log(f"{header}: done in {result.seconds:.1f}s, peak memory {fmt_bytes(result.peak_rss_bytes)}"
                    + (f" — {brief}" if brief else ""))
    return saved


def _remove_checkpoints(path: Path) -> None:
    """Remove a finished stage's checkpoints, and ``checkpoints/`` once empty."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # missing, or another stage's checkpoints are there


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment(ctx) -> dict:
    from .models.loading import versions

    return {**ctx.runtime.describe(), "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions()}


def _model_info(handle) -> dict:
    return {"path": str(handle.path), "size_bytes": handle.size_bytes, "description": handle.describe(),
            "meta": handle.meta}


def _finish(ctx, stages: list[dict], timing: dict) -> dict:
    from .report import build_report, summary_table, write_report

    env = {**environment(ctx), **timing, "finished": _now()}
    report = build_report(recipe=ctx.recipe, environment=env, stages=stages,
                          original=_model_info(ctx.original), compressed=_model_info(ctx.current))
    paths = write_report(ctx.run_dir, report)
    for kind in dict.fromkeys(s["result"]["type"] for s in stages if s["result"]["type"] in STAGES):
        hook = getattr(STAGES.get(kind), "after_report", None)  # (quantize/prune entries are unions of methods)
        if hook is not None:
            hook(ctx.run_dir, report, ctx.console)  # export: the cards get the final figures, push_to_hub
    ctx.console.print(summary_table(report))
    ctx.console.print(f"report: {paths['markdown']}")
    return report
