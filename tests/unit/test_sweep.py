"""Sweeps on the tiny model: expansion (grid, list, naming), validation before anything runs, the local executor
(resume, one failure not stopping the others, retries, the shared baseline), recommendation rules and the files."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from llmcompress.errors import RecipeError
from llmcompress.sweep.config import RayExecutorConfig, RecommendRule, load_sweep
from llmcompress.sweep.expand import expand
from llmcompress.sweep.recommend import recommend
from llmcompress.sweep.runner import run_sweep

from test_pipeline import fast_recipe


def write_sweep(tmp_path: Path, **body) -> Path:
    """A sweep file beside a base recipe file (base.yaml: the tiny rtn -> evaluate -> benchmark recipe)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(fast_recipe(name="base")))
    body = {"name": "s", "base": "base.yaml", **body}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def points_of(path: Path):
    return expand(load_sweep(path), path)


# ---------------------------------------------------------------------------------------------------------------------
# Expansion and validation (no weights load)


def test_grid_is_the_cartesian_product_plus_the_list_with_readable_stable_names(tmp_path):
    path = write_sweep(tmp_path, set={"seed": 3},
                       grid={"stages.0.method": ["rtn", "hqq"], "stages.0.bits": [4, 8]},
                       list=[{"stages.0": {"type": "quantize", "method": "bnb-nf4"}},
                             {"name": "rtn3-sym", "stages.0.bits": 3, "stages.0.symmetric": True}])
    points = points_of(path)
    assert [p.name for p in points] == ["rtn-bits4", "rtn-bits8", "hqq-bits4", "hqq-bits8", "bnb-nf4", "rtn3-sym"]
    assert all(p.valid for p in points)
    assert points[3].overrides == ["stages.0.method=hqq", "stages.0.bits=8"]
    assert points[4].overrides == ['stages.0={"type": "quantize", "method": "bnb-nf4"}']
    hqq8 = points[3].recipe
    assert (hqq8.name, hqq8.stages[0].method, hqq8.stages[0].bits, hqq8.seed) == ("hqq-bits8", "hqq", 8, 3)
    assert points[5].recipe.stages[0].symmetric and points[5].source == "list[1]"
    assert hqq8.path == (tmp_path / "base.yaml").resolve()  # relative paths stay relative to the base recipe
    assert [p.name for p in points_of(path)] == [p.name for p in points]  # stable


def test_naming_template_and_inline_base(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": fast_recipe(), "naming": "{stages.0.method}-w{stages.0.bits}",
                                    "grid": {"stages.0.bits": [2, 8]}}))
    points = points_of(path)
    assert [p.name for p in points] == ["rtn-w2", "rtn-w8"] and points[0].recipe.path == path.resolve()


def test_grid_combinations_that_do_not_validate_are_skipped_with_the_reason(tmp_path):
    path = write_sweep(tmp_path, grid={"stages.0.method": ["rtn", "hqq"], "stages.0.bits": [4, 5]})
    points = points_of(path)
    assert [(p.name, p.valid) for p in points] == [("rtn-bits4", True), ("rtn-bits5", True),
                                                   ("hqq-bits4", True), ("hqq-bits5", False)]
    assert "`bits`" in points[3].error and "2, 3, 4 or 8" in points[3].error and "got 5" in points[3].error


@pytest.mark.parametrize("body,expected", [
    ({"grid": {"stages.0.bits": [4]}, "executor": {"type": "ray", "num_cpu": 1}},
     ["unknown key `num_cpu` in `executor`", "Did you mean `num_cpus`?"]),
    ({"grid": {"stages.0.bits": [4]}, "recomend": []}, ["unknown key `recomend`", "Did you mean `recommend`?"]),
    ({}, ["give a `grid`"]),
    ({"grid": {"stages.0.bits": []}}, ["grid key `stages.0.bits` has no values"]),
    ({"grid": {"name": ["a"]}}, ["use `naming:`"]),
    ({"grid": {"stages.7.bits": [4, 8]}}, ["sweep.yaml: grid point 0 (stages.7.bits=4)",
                                           "not an index of a list with 3 items"]),
    ({"base": "nope.yaml", "grid": {"stages.0.bits": [4]}}, ["sweep.yaml: `base`: no recipe file", "Fix:"]),
    ({"grid": {"stages.0.bits": [4]}, "list": [{"stages.0.bitz": 4}]},
     ["sweep.yaml: list[0] (stages.0.bitz=4) -> recipe", "unknown key `bitz`", "Fix: correct these list entries"]),
    ({"grid": {"stages.0.method": ["hqq"], "stages.0.bits": [4, 5]}, "on_invalid": "fail"},
     ["grid point 1 (stages.0.method=hqq, stages.0.bits=5)", "`on_invalid: skip`"]),
    ({"grid": {"stages.0.bits": [9, 10]}}, ["No recipe of the sweep validates"]),
    ({"grid": {"stages.0.bits": [4, 8]}, "naming": "same"}, ["recipe name `same` is given to grid point 0",
                                                             "Fix: use a `naming:` template"]),
    ({"grid": {"stages.0.bits": [4]}, "recommend": [{"pick": "smallest", "min_quality_recovery": "lots%"}]},
     ["not a percentage"]),
])
def test_mistakes_stop_the_sweep_before_anything_runs_naming_the_place(tmp_path, body, expected):
    path = write_sweep(tmp_path, **body)
    with pytest.raises(RecipeError) as e:
        points_of(path)
    for text in expected:
        assert text in str(e.value), str(e.value)
    assert str(path) in str(e.value)


def test_cli_dry_run_lists_the_recipes_and_bad_sweeps_exit_2(tmp_path):
    from test_cli import cli

    path = write_sweep(tmp_path, grid={"stages.0.method": ["rtn", "hqq"], "stages.0.bits": [4, 5]})
    r = cli("sweep", path, "--dry-run", "--output", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "rtn-bits5" in r.stderr and "skipped" in r.stderr and not (tmp_path / "out").exists()
    bad = write_sweep(tmp_path, grid={"stages.0.bits": [4]}, executor="slurm")
    r = cli("sweep", bad)
    assert r.returncode == 2 and "executor" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_command_line_executor_and_address_override_the_file(tmp_path):
    from llmcompress.sweep.runner import resolve_executor

    local = load_sweep(write_sweep(tmp_path, grid={"stages.0.bits": [4]}))
    assert resolve_executor(local).type == "local"
    assert resolve_executor(local, "ray").model_dump() == RayExecutorConfig().model_dump()
    assert resolve_executor(local, address="auto").address == "auto"
    ray = load_sweep(write_sweep(tmp_path, grid={"stages.0.bits": [4]}, executor={"type": "ray", "num_gpus": 1}))
    got = resolve_executor(ray, address="ray://head:10001")
    assert (got.num_gpus, got.address, got.local) == (1, "ray://head:10001", False)
    assert resolve_executor(ray, "local").type == "local"
    with pytest.raises(RecipeError, match="unknown sweep executor `slurm`"):
        resolve_executor(ray, "slurm")
    for sweep in (local, ray):  # never silently ignored
        with pytest.raises(RecipeError, match="--address ray://h:10001 needs --executor ray"):
            resolve_executor(sweep, "local", "ray://h:10001")


def test_a_missing_ray_stops_the_sweep_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util

    from llmcompress.errors import MissingExtraError

    write_sweep(tmp_path, grid={"stages.0.bits": [4]}, executor={"type": "ray", "address": "auto"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(MissingExtraError, match=r"llmcompress\[ray\]"):
        run_sweep(tmp_path / "sweep.yaml", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and "RAY_AUTH_MODE" not in os.environ


def test_a_crashed_training_run_is_retried_not_taken_for_bad_input(tmp_path, monkeypatch):
    from rich.console import Console

    import llmcompress.pipeline as pipeline
    from llmcompress.errors import RunCrashed
    from llmcompress.sweep.config import LocalExecutorConfig
    from llmcompress.sweep.local import LocalExecutor

    calls = []

    def crash(recipe, *a, **k):
        calls.append(recipe.name)
        raise RunCrashed("lora: the training processes failed (exit -9); the end of train-processes.log: ...")

    monkeypatch.setattr(pipeline, "run_recipe", crash)
    job = {"name": "lora", "raw": fast_recipe(name="lora"), "origin": None, "run_dir": str(tmp_path / "lora")}
    executor = LocalExecutor(LocalExecutorConfig(retries=1), Console(file=io.StringIO()), show_progress=False)
    [outcome] = executor.run([job], lambda o: None)
    assert calls == ["lora", "lora"] and outcome["attempts"] == 2  # retried once, like any crash
    assert outcome["error_kind"] == "runtime" and "exit -9" in outcome["error"]


# ---------------------------------------------------------------------------------------------------------------------
# Recommendation rules (rows as run_row makes them; made-up figures)


ROWS = [
    {"name": "big-good", "size_bytes": 150 * 2**20, "quality_recovery": 0.99, "speedup": 0.9, "kl_mean": 0.01},
    {"name": "mid", "size_bytes": 110 * 2**20, "quality_recovery": 0.96, "speedup": 1.2, "kl_mean": 0.1},
    {"name": "small-bad", "size_bytes": 100 * 2**20, "quality_recovery": 0.80, "speedup": 1.5, "kl_mean": 0.3},
    {"name": "unmeasured", "size_bytes": 90 * 2**20, "quality_recovery": None, "speedup": None, "kl_mean": None},
]


def test_recommendation_rules_pick_the_best_run_that_meets_every_bound():
    rule = RecommendRule(pick="smallest", min_quality_recovery="95%")
    assert rule.min_quality_recovery == 0.95 and rule.describe() == "smallest model with quality recovery ≥ 95%"
    got = recommend(rule, ROWS)
    assert got["pick"] == "mid" and got["candidates"] == 2 and "no quality_recovery" in got["excluded"]["unmeasured"]
    assert recommend(RecommendRule(pick="fastest", max_size_mib=120), ROWS)["pick"] == "small-bad"
    assert recommend(RecommendRule(pick="fastest", max_size_mib=120, max_kl=0.2), ROWS)["pick"] == "mid"
    assert recommend(RecommendRule(pick="best-quality"), ROWS)["pick"] == "big-good"
    none = recommend(RecommendRule(pick="smallest", min_quality_recovery=0.999), ROWS)
    assert none["pick"] is None and "closest: big-good" in none["why"]


# ---------------------------------------------------------------------------------------------------------------------
# Running (local executor)


@pytest.fixture
def own_cache(tmp_path, monkeypatch, _isolated_cache):
    """A results cache of this test's own (model folders shared): baseline reuse is counted from zero."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(_isolated_cache / "models", target_is_directory=True)
    monkeypatch.setenv("LLMCOMPRESS_CACHE", str(root))
    return root


def corrupt_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model folder whose weights do not fit its config.json: it validates (whole files), then loading it crashes
    inside transformers (a crash to retry, not a recipe mistake found up front). Also writes ``bad-data.txt``
    beside it, a lora data file too short for the windows asked of it: a mistake found only once the model's
    tokenizer counts its tokens."""
    bad = tmp_path / "corrupt-model"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(config))
    (tmp_path / "bad-data.txt").write_text("Too short to train on.\n")
    return bad


def test_local_sweep_runs_resumes_and_reports_failures_without_stopping(tmp_path, own_cache, tiny_model_dir,
                                                                        monkeypatch):
    bad = corrupt_model(tmp_path, tiny_model_dir)
    path = write_sweep(
        tmp_path, grid={"stages.0.method": ["rtn", "hqq"], "stages.0.bits": [4, 8]},
        list=[{"name": "crashes", "model": str(bad)},
              {"name": "missing-data", "stages.0": {"type": "lora", "objective": "distill", "steps": 1,
                                                    "data": {"source": "bad-data.txt", "skip_tokens": 0}}}],
        executor={"type": "local", "retries": 1},
        recommend=[{"pick": "smallest", "min_quality_recovery": 0.9}, {"pick": "fastest", "max_size_mib": 0.001}])
    out = tmp_path / "out"
    summary = run_sweep(path, out, show_progress=False)
    by = {o["name"]: o for o in summary["outcomes"]}
    assert {n: o["status"] for n, o in by.items()} == {"rtn-bits4": "done", "hqq-bits4": "done", "rtn-bits8": "done",
                                                       "hqq-bits8": "done", "crashes": "failed",
                                                       "missing-data": "failed"}
    assert by["crashes"]["error_kind"] == "runtime" and by["crashes"]["attempts"] == 2  # retried once
    assert "RuntimeError" in by["crashes"]["error"] and "mismatch" in by["crashes"]["error"]
    assert by["missing-data"]["error_kind"] == "input" and by["missing-data"]["attempts"] == 1  # bad input: no retry
    assert "bad-data.txt` has" in by["missing-data"]["error"] and "Fix: add text" in by["missing-data"]["error"]
    # The original's evaluation was computed by the first recipe and reused by the later ones.
    assert summary["baseline"] == {"runs": 4, "computed": 1, "reused": 3}
    first, second = (json.loads((out / "runs" / n / "report.json").read_text()) for n in ("rtn-bits4", "rtn-bits8"))
    ev = [next(s for s in r["stages"] if s["type"] == "evaluate")["data"] for r in (first, second)]
    assert ev[0]["timing"]["original"]["cached"] is False and ev[1]["timing"]["original"]["cached"] is True
    assert ev[0]["original"] == ev[1]["original"]
    # The files.
    rows = summary["rows"]
    assert rows[0]["name"] == "original" and rows[0]["status"] == "reference"
    assert [r["name"] for r in rows[-2:]] == ["crashes", "missing-data"]
    assert any(r.get("pareto") for r in rows) and summary["recommendations"][0]["pick"] in by
    assert summary["recommendations"][1]["pick"] is None
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,method,size_bytes") and len(csv_lines) == 1 + 1 + 6
    md = (out / "leaderboard.md").read_text()
    assert "**Recommended — smallest model with quality recovery ≥ 90%:**" in md and "![Pareto front](pareto.png)" in md
    assert "**crashes** failed after 2 attempts" in md and "(bad input: not retried)" in md
    assert "computed 1 time(s) and reused from the cache by 3 of 4 runs" in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["counts"] == {"points": 6, "done": 4, "resumed": 0, "failed": 2, "skipped": 0, "pending": 0}

    # A re-run skips the finished recipes without loading anything, and retries only the failed ones.
    import llmcompress.pipeline as pipeline

    ran = []
    real = pipeline.run_recipe
    monkeypatch.setattr(pipeline, "run_recipe", lambda recipe, *a, **k: ran.append(recipe.name) or real(recipe, *a,
                                                                                                          **k))
    again = run_sweep(path, out, show_progress=False)
    assert sorted(ran) == ["crashes", "crashes", "missing-data"]
    assert {o["name"]: o["status"] for o in again["outcomes"]}["rtn-bits4"] == "resumed"
    assert [r.get("quality") for r in again["rows"]] == [r.get("quality") for r in rows]


def test_concurrent_recipes_compute_the_baseline_once(make_ctx, own_cache):
    ctx = make_ctx()
    calls = []

    def compute():
        calls.append(1)
        threading.Event().wait(0.3)  # long enough for the other thread to ask meanwhile
        return {"ppl": 1.0}

    results = []
    threads = [threading.Thread(target=lambda: results.append(ctx.baseline("k", {"a": 1}, compute))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [{"ppl": 1.0}] * 3


def test_reading_and_expanding_a_sweep_is_light():
    from test_import_light import _imported_after

    root = Path(__file__).resolve().parents[2]
    code = ("from llmcompress.sweep.config import load_sweep\nfrom llmcompress.sweep.expand import expand\n"
            f"p = {str(root / 'recipes/sweeps/smollm2-methods.yaml')!r}\nexpand(load_sweep(p), p)")
    assert _imported_after(code + "\nimport sys\nassert 'ray' not in sys.modules") == []


def test_the_methods_sweep_expands_to_seven_valid_recipes():
    root = Path(__file__).resolve().parents[2]
    path = root / "recipes" / "sweeps" / "smollm2-methods.yaml"
    points = points_of(path)
    assert [p.name for p in points] == ["rtn-bits4", "rtn-bits8", "hqq-bits4", "hqq-bits8", "bnb-nf4", "bnb-int8",
                                        "torchao-int8wo"]
    assert all(p.valid and p.recipe.threads == 1 for p in points)


def test_docstring_samples_load():
    import llmcompress.lora.distributed as dist
    import llmcompress.sweep.config as config
    from llmcompress.lora.distributed import AccelerateConfig
    from llmcompress.sweep.config import SweepConfig

    def sample(module) -> dict:
        return yaml.safe_load(module.__doc__.split("```yaml")[1].split("```")[0])

    sweep = SweepConfig.model_validate(sample(config))
    assert sweep.grid["stages.0.bits"] == [4, 8] and sweep.recommend[0].min_quality_recovery == 0.95
    block = sample(dist)[0]["accelerate"]
    assert AccelerateConfig.model_validate(block).fsdp.version == 2
