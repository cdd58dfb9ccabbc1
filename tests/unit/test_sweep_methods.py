"""The methods table (docs/methods.md) is a sweep's Markdown output: a small sweep over two cheap methods on the tiny
model writes docs/methods.md's columns, and its cells are the runs' report.json figures, formatted by
llmcompress.report, from the same rows (``run_row``) the sweep leaderboard and the app's Reports tab show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmcompress.report import metrics as M
from llmcompress.report.leaderboard import run_row
from llmcompress.sweep import methods
from llmcompress.sweep.config import load_sweep
from llmcompress.sweep.expand import expand
from llmcompress.sweep.runner import run_sweep
from llmcompress.utils.io import read_yaml

ROOT = Path(__file__).resolve().parents[2]
FAST_EVAL = {"type": "evaluate", "tasks": ["pydoc_cloze"], "limit": 8,
             "perplexity": {"max_tokens": 256, "ctx_len": 128, "stride": 64}}
FAST_BENCH = {"type": "benchmark", "batch_sizes": [1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 1,
              "warmup": 0, "memory": False}
HEADER = ["method", "recipe", "bits / weight", "size on disk", "perplexity (vs original)", "KL vs original",
          "top-1 agreement", "pydoc_cloze acc (vs original)", "decode tok/s, batch 1, 1 thread (vs original)",
          "quantize / prune time"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A methods sweep over rtn and magnitude pruning (run for real) and an entry that cannot run (hqq at 5 bits)."""
    root = tmp_path_factory.mktemp("methods")
    base = {"name": "base", "model": "tiny-random-llama", "threads": 1,
            "stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}, FAST_EVAL, FAST_BENCH]}
    (root / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    body = {"name": "tiny-methods", "base": "base.yaml", "markdown": "docs/methods.md", "on_invalid": "skip-all",
            "list": [{"name": "tiny-rtn4"},
                     {"name": "tiny-magnitude-50", "stages.0": {"type": "prune", "method": "magnitude",
                                                                "sparsity": 0.5}},
                     {"name": "tiny-hqq5", "stages.0": {"type": "quantize", "method": "hqq", "bits": 5}}]}
    (root / "sweep.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    (root / "docs").mkdir()
    (root / "docs" / "methods.md").write_text("stale page\n\n<!-- ladder:begin -->\nthe ladder\n<!-- ladder:end -->\n")
    summary = run_sweep(root / "sweep.yaml", root / "out", show_progress=False)
    reports = {n: json.loads((root / "out" / "runs" / n / "report.json").read_text())
               for n in ("tiny-rtn4", "tiny-magnitude-50")}
    return root, summary, reports, (root / "docs" / "methods.md").read_text()


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows keyed by the method cell (``**rtn**``), cells stripped."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| **"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out[cells[0].strip("*").split("**")[0]] = cells
    return out


def test_the_table_has_the_methods_columns_and_the_reports_figures(swept):
    root, summary, reports, text = swept
    head = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in head.strip("|").split(" | ")] == HEADER
    rows = _rows(text)
    assert list(rows) == ["original", "rtn", "hqq", "magnitude"]  # original, quantize by bits (rtn first), prune

    rep = reports["tiny-rtn4"]
    cmp = rep["comparison"]
    ppl, acc = cmp["eval"]["metrics"]["perplexity"]["perplexity"], cmp["eval"]["metrics"]["pydoc_cloze"]["acc"]
    dec = cmp["bench"]["figures"]["decode_tok_s_bs1"]
    quant = next(s for s in rep["stages"] if s["type"] == "quantize")
    assert rows["rtn"][1:] == [
        "[tiny-rtn4](../sweep.yaml)",  # the sweep file, relative to the page
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


def test_an_entry_that_cannot_run_here_is_a_row_that_says_why(swept):
    _, summary, _, text = swept
    hqq = _rows(text)["hqq"]
    assert hqq[2] == "?" and hqq[3].startswith("cannot run here: ") and hqq[4:] == [""] * 6
    assert {o["name"]: o["status"] for o in summary["outcomes"]}["tiny-hqq5"] == "skipped"
    assert "Rows without figures (see the row for why): hqq." in text
    assert "Registered methods not in `" in text and "gptq" in text.split("Registered methods not in")[1]


def test_the_page_states_how_it_was_measured_and_what_the_rows_say(swept):
    _, _, reports, text = swept
    assert "- Speed: hf backend" in text
    assert "- Generated by `llmcompress sweep " in text and "- Machine: " in text and "torch threads 1" in text
    assert "limit 8 items per task" in text
    facts = text.split("## Reading the table", 1)[1].split("## Runs", 1)[0]
    ppl = reports["tiny-rtn4"]["comparison"]["eval"]["metrics"]["perplexity"]["perplexity"]
    assert f"At 4 bits, by perplexity (lower is better): rtn {M.fmt_number(ppl['compressed'])}" in facts
    runs = text.split("## Runs", 1)[1]
    assert "| tiny-rtn4 |" in runs and "| tiny-magnitude-50 |" in runs and "tiny-hqq5" not in runs
    assert text.rstrip().endswith("<!-- ladder:end -->") and "\nthe ladder\n" in text and "stale page" not in text


def test_the_table_the_leaderboard_and_the_app_read_the_same_rows(swept):
    from llmcompress.ui.reports import leaderboard, scan

    root, summary, reports, _ = swept
    board = {r["name"]: r for r in summary["rows"]}
    for name, report in reports.items():
        row = run_row(report, root / "out" / "runs" / name)
        assert {k: board[name][k] for k in row} == json.loads(json.dumps(row, default=str))
    app_rows, _ = leaderboard(scan(root / "out" / "runs"))
    app = {r["name"]: r for r in app_rows}
    for name, report in reports.items():
        assert {k: v for k, v in app[name].items() if k not in ("name", "run_dir")} == \
               {k: v for k, v in run_row(report).items() if k not in ("name", "run_dir")}
    entries = methods.entries(expand(load_sweep(root / "sweep.yaml"), root / "sweep.yaml"), summary["rows"],
                              summary["outcomes"])
    assert {e.name: e.row for e in entries if e.report} == {n: board[n] for n in reports}


def test_the_methods_sweep_is_the_method_recipes():
    """recipes/sweeps/methods.yaml: each entry is, stage for stage, the recipe in recipes/ of the same name."""
    path = ROOT / "recipes" / "sweeps" / "methods.yaml"
    sweep = load_sweep(path)
    assert sweep.markdown == "../../docs/methods.md"
    for p in expand(sweep, path, preflight=False):
        raw = read_yaml(ROOT / "recipes" / f"{p.name}.yaml")
        assert {**raw, "name": p.name} == p.raw, p.name
