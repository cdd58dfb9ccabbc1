"""Fixtures of the app's tests: a runs folder with one tiny compressed run, the pool loaded from it, fake backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from ui_fakes import fake_pool


@pytest.fixture(scope="session")
def tiny_runs_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """runs/tiny-rtn: the tiny llama, rtn 4-bit, then a short benchmark (a report with size and speed)."""
    from llmcompress.pipeline import run_recipe

    runs = tmp_path_factory.mktemp("app-runs")
    recipe = {"name": "tiny-rtn", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
              "stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32},
                         {"type": "benchmark", "batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 4,
                          "repeats": 1, "warmup": 0, "memory": False}]}
    from llmcompress.recipe import load_recipe

    run_recipe(load_recipe(recipe), runs / "tiny-rtn", show_progress=False)
    return runs


@pytest.fixture(scope="session")
def tiny_pool(tiny_runs_dir):
    """The original tiny llama and its rtn run, loaded once (hf backend, 1 thread, fp32)."""
    from llmcompress.context import Runtime
    from llmcompress.ui.pool import ModelPool, find_runs, plan

    candidates, skipped = plan(find_runs(tiny_runs_dir))
    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    runtime.apply()
    with ModelPool.load(candidates, runtime, ("hf",), skipped=skipped, log=lambda m: None) as pool:
        yield pool


@pytest.fixture
def make_fake_pool():
    return fake_pool
