"""The runner on the tiny model: run folder layout, report, resume, re-run on change, crash safety."""

from __future__ import annotations

import json

import pytest

from llmcompress.pipeline import run_recipe
from llmcompress.recipe import load_recipe

FAST_EVAL = {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 512, "ctx_len": 128, "stride": 64}}
FAST_BENCH = {"type": "benchmark", "batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1,
              "warmup": 0, "memory": False}


def fast_recipe(**over) -> dict:
    return {"name": "fast", "model": "tiny-random-llama", "threads": 1,
            "stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}, FAST_EVAL, FAST_BENCH],
            **over}


def run(raw: dict, out, **kw) -> dict:
    return run_recipe(load_recipe(raw), out, show_progress=False, **kw)


def stage_states(out) -> dict[str, bool]:
    return {s["dir"]: s["resumed"] for s in json.loads((out / "report.json").read_text())["stages"]}


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def test_run_writes_the_documented_layout(out):
    report = run(fast_recipe(), out)
    for name in ("recipe.resolved.yaml", "manifest.json", "report.json", "report.md",
                 "01-quantize/result.json", "01-quantize/model/config.json", "01-quantize/model/llmcompress.json",
                 "02-evaluate/result.json", "03-benchmark/result.json"):
        assert (out / name).is_file(), name
    assert list((out / "plots").glob("*.png"))
    assert load_recipe(out / "recipe.resolved.yaml").model_dump() == load_recipe(fast_recipe()).model_dump()
    assert set(report) >= {"recipe", "environment", "models"}
    env = report["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and "torch" in env["versions"]
    orig, comp = report["models"]["original"], report["models"]["compressed"]
    assert comp["size_bytes"] < orig["size_bytes"]
    assert orig["eval"]["perplexity"]["perplexity"] > 1 and comp["kl"]["kl_mean"] > 0
    assert orig["bench"]["decode_tok_s_bs1"] > 0 and comp["bench"]["decode_tok_s_bs1"] > 0
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_rerun_resumes_every_finished_stage(out):
    run(fast_recipe(), out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("0*/result.json")}
    run(fast_recipe(), out)
    assert all(stage_states(out).values())
    assert {p: p.stat().st_mtime_ns for p in out.glob("0*/result.json")} == before


def test_changed_stage_reruns_it_and_the_ones_after(out):
    run(fast_recipe(), out)
    changed = fast_recipe()
    changed["stages"][1] = {**FAST_EVAL, "perplexity": {**FAST_EVAL["perplexity"], "max_tokens": 256}}
    run(changed, out)
    assert stage_states(out) == {"01-quantize": True, "02-evaluate": False, "03-benchmark": False}


def test_fresh_starts_over(out):
    run(fast_recipe(), out)
    run(fast_recipe(), out, fresh=True)
    assert not any(stage_states(out).values())


def test_a_stage_killed_half_way_is_redone_and_its_leftovers_dropped(out):
    run(fast_recipe(), out)
    (out / "02-evaluate" / "result.json").unlink()  # as if killed before the result was written
    (out / "02-evaluate" / "half-written.bin").write_bytes(b"junk")
    run(fast_recipe(), out)
    assert stage_states(out) == {"01-quantize": True, "02-evaluate": False, "03-benchmark": False}
    assert not (out / "02-evaluate" / "half-written.bin").exists()


def test_a_torn_result_file_is_not_trusted(out):
    run(fast_recipe(), out)
    (out / "01-quantize" / "result.json").write_text('{"fingerprint": ')
    run(fast_recipe(), out)
    assert not any(stage_states(out).values())


def test_a_crash_keeps_finished_stages_and_resume_continues(out, monkeypatch):
    from llmcompress.bench.stage import BenchmarkStage

    def boom(self, ctx):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(BenchmarkStage, "run", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(fast_recipe(), out)
    assert (out / "02-evaluate" / "result.json").is_file()
    assert not (out / "03-benchmark" / "result.json").exists() and not (out / "report.json").exists()
    monkeypatch.undo()
    run(fast_recipe(), out)
    assert stage_states(out) == {"01-quantize": True, "02-evaluate": True, "03-benchmark": False}


def test_resumed_quantized_model_is_reloaded_from_disk(out):
    run(fast_recipe(), out)
    report = run(fast_recipe(), out)
    assert report["models"]["compressed"]["path"].endswith("01-quantize/model")


def test_evaluate_only_recipe_compares_the_original_with_itself(out):
    report = run(fast_recipe(stages=[FAST_EVAL]), out)
    models = report["models"]
    assert models["original"]["size_bytes"] == models["compressed"]["size_bytes"]
    assert models["original"]["eval"]["perplexity"] == models["compressed"]["eval"]["perplexity"]


def test_runtime_errors_from_a_stage_name_the_recipe_and_stage(out, tmp_path):
    from llmcompress.errors import RecipeError

    f = tmp_path / "r.yaml"
    f.write_text("name: r\nmodel: tiny-random-llama\nstages:\n  - {type: quantize, method: rtn, group_size: 48}\n")
    with pytest.raises(RecipeError) as e:
        run_recipe(f, out, show_progress=False)
    assert str(e.value).startswith(f"{f}: stages[0] (quantize:rtn): ") and "does not divide" in str(e.value)


def test_a_working_copy_changed_in_place_never_touches_its_folder(make_ctx, tiny_model_dir):
    """Stages quantize and prune a copy loaded from the folder (no deep copy); its memory-mapped weights are
    copy-on-write, so the folder's weights stay as they were."""
    import hashlib

    import torch

    ctx = make_ctx()
    files = sorted(tiny_model_dir.glob("*.safetensors"))
    before = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    model, _ = ctx.working_copy()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert ctx.original._loaded is None and ctx.current._loaded is None
    del model
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == before
    fresh, _ = ctx.original.load()
    assert all(p.abs().sum() > 0 for p in fresh.parameters() if p.dim() == 2)
