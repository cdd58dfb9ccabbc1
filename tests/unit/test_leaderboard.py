"""Leaderboard rows, Pareto front and its plot. Reports are built by build_report from fixture stage results
(made-up numbers in the format the stages write, not measurements)."""

from __future__ import annotations

import copy

import pytest

from llmcompress.report import build_report, leaderboard as L

from test_report import COMPRESSED, ENV, ORIGINAL, RECIPE, _stages


def _report(name: str, size: int, ppl: float, decode1: float, kl: float = 0.08) -> dict:
    stages = copy.deepcopy(_stages())
    stages[0]["result"]["data"]["size_bytes"] = size
    ev = stages[1]["result"]["data"]
    ev["compressed"]["perplexity"]["perplexity"] = ppl
    ev["compressed"]["kl"]["kl_mean"] = kl
    bench = stages[2]["result"]["data"]
    bench["compressed"].update(size_bytes=size, decode_tok_s_bs1=decode1, decode_ms_per_token_bs1=1000 / decode1)
    bench["ratios"] = {k: bench["compressed"][k] / bench["original"][k] for k in bench["original"]}
    return build_report(recipe={**RECIPE, "name": name}, environment=ENV, stages=stages, original=ORIGINAL,
                        compressed={**COMPRESSED, "size_bytes": size, "path": f"runs/{name}/01-quantize/model"})


def test_row_takes_the_reports_headline_figures():
    row = L.run_row(_report("nf4", 86_700_000, 18.585, 26.0), "runs/nf4")
    assert row["name"] == "nf4" and row["method"] == "bnb-nf4" and row["run_dir"] == "runs/nf4"
    assert row["size_bytes"] == 86_700_000 and row["size_original_bytes"] == ORIGINAL["size_bytes"]
    assert row["quality_metric"] == "perplexity" and row["quality"] == 18.585 and row["quality_original"] == 17.5
    assert row["quality_recovery"] == pytest.approx(17.5 / 18.585)  # lower is better: original / compressed
    assert row["accuracy_metric"] == "pydoc_cloze:acc"
    assert row["accuracy_recovery"] == pytest.approx(0.42 / 0.45)  # higher is better: compressed / original
    assert row["speedup"] == pytest.approx(26.0 / 20.0) and row["speed_figure"] == "decode_tok_s_bs1"
    assert row["kl_mean"] == 0.08 and row["top1_agreement"] == 0.91
    assert row["measured"] == {"device": "cpu", "threads": 1, "dtype": "bfloat16"}


def test_original_row_is_the_reference_point():
    row = L.original_row(_report("nf4", 86_700_000, 18.585, 26.0))
    assert row["size_bytes"] == ORIGINAL["size_bytes"] and row["quality"] == 17.5 and row["speed"] == 20.0
    assert (row["quality_recovery"], row["speedup"], row["size_shrink"], row["kl_mean"]) == (1.0, 1.0, 1.0, 0.0)


def test_pareto_front_keeps_exactly_the_undominated_runs():
    rows = [L.run_row(r) for r in (
        _report("small-bad", 60_000_000, 25.0, 24.0),    # smallest: on the front
        _report("mid-good", 86_700_000, 18.0, 24.0),     # better quality than small-bad: on the front
        _report("mid-worse", 86_700_000, 19.0, 23.0),    # dominated by mid-good on every objective
        _report("big-fast", 150_000_000, 18.0, 40.0),    # fastest: on the front
    )]
    assert L.pareto_front(rows) == [True, True, False, True]
    # Size and quality only: big-fast is now dominated by mid-good (same quality, smaller).
    assert L.pareto_front(rows, [("size_bytes", "lower"), ("quality_recovery", "higher")]) == [True, True, False, False]


def test_pareto_compares_only_what_both_rows_measured_and_skips_rows_without_figures():
    a = {"size_bytes": 10, "quality_recovery": None, "speedup": 1.0}
    b = {"size_bytes": 20, "quality_recovery": 0.9, "speedup": 1.0}
    empty = {"size_bytes": None, "quality_recovery": None, "speedup": None}
    assert L.dominates(a, b) and not L.dominates(b, a)
    assert L.pareto_front([a, b, empty]) == [True, False, False]
    assert not L.dominates(b, dict(b))  # equal rows do not dominate each other
    assert L.pareto_front([b, dict(b)]) == [True, True]


def test_pareto_figure_draws_every_point_and_the_frontier(tmp_path):
    reports = [_report("a", 60_000_000, 25.0, 24.0), _report("b", 86_700_000, 18.0, 24.0),
               _report("c", 86_700_000, 19.0, 23.0)]
    rows = [L.original_row(reports[0])] + [L.run_row(r) for r in reports]
    front = L.pareto_front(rows)
    fig = L.pareto_figure(rows, front, caption="made-up fixture numbers")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "size (MiB)" and ax.get_ylabel() == "quality recovery"
    assert sorted(t.get_text() for t in ax.texts) == ["a", "b", "c", "original"]
    frontier = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert len(frontier) == 1 and len(frontier[0].get_xdata()) == sum(front)
    path = L.save_figure(fig, tmp_path / "plots" / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(path.parent.glob(".*tmp*"))


def test_save_figure_leaves_no_file_behind_when_drawing_fails(tmp_path):
    class Failing:
        def savefig(self, f, **kwargs):
            assert kwargs == {"format": "png", "bbox_inches": "tight"}
            f.write(b"half a png")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        L.save_figure(Failing(), tmp_path / "pareto.png")
    assert list(tmp_path.iterdir()) == []


def test_format_cell():
    assert L.format_cell("size_bytes", 3 * 2**20) == "3.0 MiB"
    assert L.format_cell("speedup", 1.234) == "1.23x"
    assert L.format_cell("quality_recovery", 0.9412) == "94.1%"
    assert L.format_cell("kl_mean", None) == "—"
