"""The cost estimate `validate` prints and the refusal of a run that cannot fit this machine's memory."""

from __future__ import annotations

import pytest

from llmcompress import estimate
from llmcompress.errors import RecipeError
from llmcompress.pipeline import preflight
from llmcompress.recipe import load_recipe


def _recipe(model_dir, **extra):
    return load_recipe({"name": "est", "model": str(model_dir), "dtype": "bfloat16", **extra, "stages": [
        {"type": "prune", "method": "magnitude", "sparsity": 0.5}, {"type": "quantize", "method": "bnb-nf4"},
        {"type": "evaluate", "tasks": []}]})


def test_parameters_come_from_the_safetensors_headers(tiny_model_dir):
    from llmcompress.models.loading import load_model

    model, _ = load_model(tiny_model_dir, "cpu", "float32")
    assert estimate.safetensors_params(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_the_estimate_uses_the_measured_lines_and_names_what_was_not_measured(tiny_model_dir):
    lines = estimate.load_fit()["stages"]
    est = preflight(_recipe(tiny_model_dir))
    params = estimate.safetensors_params(tiny_model_dir)
    prune, nf4, ev = est.stages
    a, b = lines["quantize:bnb-nf4"]["peak_rss_bytes"]
    assert nf4.stage == "quantize:bnb-nf4" and nf4.peak_bytes == int(a + b * params)
    assert ev.peak_bytes > 0 and ev.seconds is not None
    assert prune.peak_bytes is None and "not measured: prune" in estimate.describe(est)
    assert est.peak_bytes == max(nf4.peak_bytes, ev.peak_bytes) and est.fits()


def test_a_run_that_cannot_fit_is_refused_before_weights_load(tiny_model_dir, monkeypatch):
    from llmcompress.utils import memory

    monkeypatch.setattr(memory, "machine_memory", lambda: {"total": 2**20, "available": 2**20})
    with pytest.raises(RecipeError, match=r"would peak at about .* and this machine has 1.0 MiB. Fix: .*"
                                          r"`memory_check: false`"):
        preflight(_recipe(tiny_model_dir))
    est = preflight(_recipe(tiny_model_dir, memory_check=False))  # the user knows better: it runs
    assert not est.fits()


def test_a_container_limit_below_the_machine_is_the_limit(monkeypatch, tmp_path):
    from llmcompress.utils import memory

    monkeypatch.setattr(memory, "_cgroup_limit", lambda: 2**30)
    assert memory.machine_memory()["total"] == 2**30
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: None)
    assert memory.machine_memory()["total"] > 2**30


def test_validate_prints_the_estimate():
    from tests.unit.test_cli import ROOT, cli

    r = cli("validate", ROOT / "recipes" / "tiny-smoke.yaml")
    assert r.returncode == 0, r.stderr
    assert "estimate:" in r.stdout and "parameters" in r.stdout and "estimated peak, time" in r.stdout


def test_a_gguf_file_is_counted_from_its_index_without_converting_it():
    from llmcompress.models.builtin import smollm2_135m, smollm2_gguf

    assert estimate.model_params(smollm2_gguf()) == estimate.model_params(smollm2_135m()) == 134_515_008
