"""Shared fixtures: a tiny random llama (built from a config, no download) and a RunContext around it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Results caches go to a fresh folder per session; built model folders are shared with the user cache
    (slow to build)."""
    from platformdirs import user_cache_dir

    real_root = Path(os.environ.get("LLMCOMPRESS_CACHE") or user_cache_dir("llmcompress"))
    real_models = real_root / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("llmcompress-cache")
    (root / "models").symlink_to(real_models, target_is_directory=True)
    os.environ.setdefault("LLMCOMPRESS_VLLM_ENV", str(real_root / "vllm-env"))  # `llmcompress setup vllm` built it
    os.environ.setdefault("LLMCOMPRESS_LLAMACPP_DIR", str(real_root / "llamacpp"))  # `setup llamacpp` built it
    old = os.environ.get("LLMCOMPRESS_CACHE")
    os.environ["LLMCOMPRESS_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LLMCOMPRESS_CACHE", None)
    else:
        os.environ["LLMCOMPRESS_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """torch at one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`), then back."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from llmcompress.models.tiny import tiny_random_llama

    return tiny_random_llama()


@pytest.fixture
def make_ctx(tmp_path, tiny_model_dir):
    """Build a RunContext on the tiny model: ``ctx = make_ctx(stages=[...])``; ctx.current is the original."""
    from llmcompress.context import ModelHandle, RunContext, Runtime, auto_dtype
    from llmcompress.recipe import load_recipe

    def make(stages: list[dict] | None = None, compressed: Path | None = None, **recipe_kw) -> RunContext:
        # bf16 unless a test asks otherwise: tiny models are fast either way, and saved folders compare bit for bit.
        raw = {"name": "t", "model": str(tiny_model_dir), "threads": 1, "dtype": "bfloat16",
               "stages": stages or [{"type": "evaluate"}], **recipe_kw}
        recipe = load_recipe(raw)
        dtype = auto_dtype("cpu") if recipe.dtype == "auto" else recipe.dtype
        runtime = Runtime(device="cpu", threads=1, dtype=dtype, seed=recipe.seed)
        runtime.apply()
        original = ModelHandle("original", tiny_model_dir, runtime)
        current = ModelHandle("compressed", compressed, runtime) if compressed else original
        stage_dir = tmp_path / "run" / "01-stage"
        stage_dir.mkdir(parents=True)
        return RunContext(recipe=recipe, run_dir=tmp_path / "run", runtime=runtime, original=original,
                          current=current, stage_dir=stage_dir)

    return make


GPU_SKIP = "needs a CUDA GPU (torch.cuda.is_available() is False here)"
#: Set by scripts/test.sh, which installs every extra: there, a test skipped for anything but a missing GPU is a failure
#: (an extra that no longer imports must not hide behind importorskip).
ALL_EXTRAS_ENV = "LLMCOMPRESS_TEST_ALL_EXTRAS"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is present and are skipped, with the reason, everywhere else."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get(ALL_EXTRAS_ENV) != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    hidden = [r for r in (reporter.stats.get("skipped", []) if reporter else []) if GPU_SKIP not in str(r.longrepr)]
    if hidden:
        for r in hidden:
            reporter.write_line(f"NOT ALLOWED with every extra installed: {r.nodeid or r.fspath} skipped: {r.longrepr}")
        session.exitstatus = 1
