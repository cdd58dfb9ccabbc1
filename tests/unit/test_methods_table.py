"""scripts/methods_table.py: the methods table is built from real run folders (two tiny-model runs) and its cells are
the reports' own figures, formatted by llmcompress.report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from llmcompress.pipeline import run_recipe
from llmcompress.recipe import load_recipe
from llmcompress.report import metrics as M

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "methods_table.py"
FAST_EVAL = {"type": "evaluate", "tasks": ["pydoc_cloze"], "limit": 8,
             "perplexity": {"max_tokens": 256, "ctx_len": 128, "stride": 64}}
FAST_BENCH = {"type": "benchmark", "batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1,
              "warmup": 0, "memory": False}
RECIPES = {
    "tiny-rtn4": {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32},
    "tiny-magnitude-50": {"type": "prune", "method": "magnitude", "sparsity": 0.5},
    "tiny-wanda": {"type": "prune", "method": "wanda", "pattern": "2:4"},  # a recipe that is never run
}


@pytest.fixture(scope="module")
def mt():
    spec = importlib.util.spec_from_file_location("methods_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """recipes/ with three tiny recipes plus one on another model, and runs/ with two of them run for real."""
    root = tmp_path_factory.mktemp("methods")
    recipes, runs = root / "recipes", root / "runs"
    recipes.mkdir()
    for name, stage in RECIPES.items():
        raw = {"name": name, "model": "tiny-random-llama", "threads": 1, "stages": [stage, FAST_EVAL, FAST_BENCH]}
        (recipes / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    other = {"name": "other-model", "model": str(tiny_model_dir), "stages": [RECIPES["tiny-rtn4"], FAST_EVAL]}
    (recipes / "other-model.yaml").write_text(yaml.safe_dump(other))  # not the table's model: left out
    reports = {name: run_recipe(load_recipe(recipes / f"{name}.yaml"), runs / name, show_progress=False)
               for name in ("tiny-rtn4", "tiny-magnitude-50")}
    return recipes, runs, reports


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by the method cell (``**rtn**``), cells stripped."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| **"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[cells[0].strip("*").split("**")[0]] = cells
    return out


def test_table_cells_are_the_reports_figures(mt, folders):
    recipes, runs, reports = folders
    text, methods = mt.build(recipes, runs, model="tiny-random-llama")
    rows = _rows(text)
    # every registered method exactly once, plus the original, first
    registered = [m for _, m in mt.registered_methods()]
    assert sorted(rows) == sorted(registered + ["original"])
    assert text.index("| **original**") < min(text.index(f"| **{m}**") for m in registered)

    rep = reports["tiny-rtn4"]
    cmp = rep["comparison"]
    ppl, acc = cmp["eval"]["metrics"]["perplexity"]["perplexity"], cmp["eval"]["metrics"]["pydoc_cloze"]["acc"]
    dec = cmp["bench"]["figures"]["decode_tok_s_bs1"]
    quant = next(s for s in rep["stages"] if s["type"] == "quantize")
    assert rows["rtn"][1:] == [
        "tiny-rtn4",  # a recipe outside the repository: its name, no link
        "4 (g32, asym)",  # rtn's default: min/max with a zero point
        f"{M.fmt_bytes(cmp['size']['compressed_bytes'])} ({cmp['size']['change']})",
        f"{M.fmt_number(ppl['compressed'])} ({ppl['change']})",
        M.fmt_number(cmp["kl"]["metrics"]["kl_mean"]["value"]),
        f"{cmp['kl']['metrics']['top1_agreement']['value']:.1%}",
        f"{M.fmt_number(acc['compressed'])} ({acc['change'].replace(' (within noise)', ', within noise')})",
        f"{M.fmt_value('decode_tok_s_bs1', dec['compressed'])} ({dec['change']})",
        f"{quant['data']['quantize_seconds']:.1f} s",
    ]

    prune = reports["tiny-magnitude-50"]
    p_stage = next(s for s in prune["stages"] if s["type"] == "prune")
    assert rows["magnitude"][2] == "16 (50% zeros)"
    assert rows["magnitude"][3] == f"{M.fmt_bytes(prune['comparison']['size']['compressed_bytes'])} (same size)"
    assert rows["magnitude"][-1] == f"{p_stage['data']['prune_seconds']:.1f} s"

    orig = rep["models"]["original"]
    assert rows["original"][3] == M.fmt_bytes(orig["size_bytes"])
    assert rows["original"][4] == M.fmt_number(orig["eval"]["perplexity"]["perplexity"])


def test_missing_runs_and_recipes_are_rows_that_say_so(mt, folders):
    recipes, runs, _ = folders
    text, _ = mt.build(recipes, runs, model="tiny-random-llama")
    rows = _rows(text)
    assert rows["wanda"][3].startswith("not run (no ") and "tiny-wanda/report.json" in rows["wanda"][3]
    assert rows["wanda"][2] == "16 (2:4)"
    assert rows["gptq"][1] == "—" and rows["gptq"][3].startswith("no recipe on tiny-random-llama")
    assert "Rows without figures (see the row for why): " in text


def test_reading_the_table_is_computed(mt, folders):
    recipes, runs, reports = folders
    text, _ = mt.build(recipes, runs, model="tiny-random-llama")
    facts = text.split("## Reading the table", 1)[1].split("## Runs", 1)[0]
    ppl = reports["tiny-rtn4"]["comparison"]["eval"]["metrics"]["perplexity"]["perplexity"]
    assert f"At 4 bits, by perplexity (lower is better): rtn {M.fmt_number(ppl['compressed'])}" in facts
    assert "- Machine: " in text and "torch threads 1" in text and "limit 8 items per task" in text


def test_a_run_stopped_half_way_says_where(mt, folders, tmp_path):
    recipes, runs, _ = folders
    half = tmp_path / "runs" / "tiny-wanda"
    (half / "01-prune").mkdir(parents=True)
    (half / "01-prune" / "result.json").write_text("{}")
    (half / "02-evaluate").mkdir()
    text, _ = mt.build(recipes, tmp_path / "runs", model="tiny-random-llama")
    assert _rows(text)["wanda"][3].startswith("did not finish: stopped in 02-evaluate after 01-prune")


def test_no_runs_at_all_still_renders_every_row(mt, folders, tmp_path):
    recipes, _, _ = folders
    text, methods = mt.build(recipes, tmp_path / "nothing", model="tiny-random-llama")
    assert "No run folder has a report yet" in text
    assert all(m.report is None for m in methods)
    assert "not run" in _rows(text)["rtn"][3]
