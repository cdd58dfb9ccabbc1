"""The report's serving section: one row per (backend, model), ratios read from the stage's paired medians, and the
reason beside every pair vLLM could not serve."""

from __future__ import annotations

from llmcompress.report.markdown import _table
from llmcompress.report.serving import serving_markdown


def _figs(out: float) -> dict:
    return {"output_tok_s_bs1": out / 4, "output_tok_s_bs8": out, "ttft_p50_ms_bs8": 20.0, "ttft_p95_ms_bs8": 30.0,
            "itl_p50_ms_bs8": 5.0, "itl_p95_ms_bs8": 9.0, "load_s": 1.5, "peak_rss_bytes": 2**30}


def _report(backends: dict, cross: dict) -> dict:
    data = {"settings": {"backends": list(backends), "batch_sizes": [1, 8], "prompt_tokens": 16, "new_tokens": 16,
                         "repeats": 3, "device": "cpu", "dtype": "float32", "threads": 1},
            "backends": backends, "cross": cross}
    return {"stages": [{"type": "evaluate", "data": {}}, {"type": "benchmark", "data": data}]}


def test_rows_ratios_and_unsupported_reasons():
    backends = {
        "hf": {"engine": {"engine": "transformers 5.17.0"}, "unsupported": {},
               "figures": {"original": _figs(100), "compressed": _figs(80)},
               "ratios": {"compressed": {"output_tok_s_bs8": 0.8}}},
        "vllm": {"engine": {"engine": "vllm 0.32.0"},
                 "unsupported": {"w4a16": "`x` is W4A16; no AVX-512 kernel. Fix: use a GPU."},
                 "figures": {"original": _figs(150), "compressed": _figs(300)},
                 "ratios": {"compressed": {"output_tok_s_bs8": 2.0}}},
    }
    cross = {"vllm/original vs hf/original": {"output_tok_s_bs8": 1.5},
             "vllm/compressed vs hf/original": {"output_tok_s_bs8": 3.0}}
    md = serving_markdown(_report(backends, cross), _table)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| backend | model | output tok/s bs1 | output tok/s bs8")
    by_pair = {tuple(c.strip() for c in r.split("|")[1:3]): r for r in rows[1:]}
    assert by_pair[("hf", "original")].rstrip(" |").endswith("1.00x | 1.00x")
    assert by_pair[("hf", "compressed")].rstrip(" |").endswith("0.80x | 0.80x")  # same backend = first backend
    assert by_pair[("vllm", "compressed")].rstrip(" |").endswith("2.0x | 3.0x")
    assert "| 20.0 / 30.0 ms |" in by_pair[("vllm", "original")]
    assert "not served" in by_pair[("vllm", "w4a16")]
    assert "**vllm / w4a16** not served here: `x` is W4A16; no AVX-512 kernel. Fix: use a GPU." in md
    assert "- **vllm**: engine vllm 0.32.0" in md


def test_absent_for_one_backend_and_two_models():
    backends = {"hf": {"engine": {}, "unsupported": {}, "ratios": {},
                       "figures": {"original": _figs(100), "compressed": _figs(80)}}}
    assert serving_markdown(_report(backends, {}), _table) == ""
    assert serving_markdown({"stages": []}, _table) == ""
