"""The benchmark stage on the tiny random llama: figures, interleaving, the memory probe, config errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from llmcompress.bench.base import GenTiming
from llmcompress.bench.stage import BenchmarkStage, summarize
from llmcompress.errors import LLMCompressError, RecipeError
from llmcompress.recipe import load_recipe

QUICK = {"type": "benchmark", "batch_sizes": [2, 1], "prompt_tokens": 8, "new_tokens": 4, "repeats": 2, "warmup": 1}


def _docstring_yaml(cls) -> list:
    """The indented block after ``Recipe sample::`` in a stage's docstring."""
    doc = textwrap.dedent(cls.__doc__.split("Recipe sample::", 1)[1])
    block = []
    for line in doc.splitlines()[1:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    return yaml.safe_load(textwrap.dedent("\n".join(block)))


def test_docstring_sample_loads_and_matches_defaults(tiny_model_dir):
    stages = _docstring_yaml(BenchmarkStage)
    recipe = load_recipe({"name": "t", "model": str(tiny_model_dir), "stages": stages})
    assert recipe.stages[0] == BenchmarkStage()  # the sample shows the defaults


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"batch_sizes": [0, 8]}, "`batch_sizes`: batch sizes must be >= 1, got [0, 8]"),
        ({"batch_sizes": []}, "`batch_sizes`: needs at least one batch size"),
        ({"batch_sizes": [8, 8]}, "must be distinct"),
        ({"new_tokens": 1}, "`new_tokens`: must be >= 2"),
        ({"prompt_tokens": 0}, "`prompt_tokens`: must be >= 1, got 0"),
        ({"repeats": 0}, "`repeats`: must be >= 1, got 0"),
        ({"warmup": -1}, "`warmup`: must be >= 0"),
        ({"backend": "vllm2"}, "`backend`"),
        ({"batch_size": [1]}, "unknown key `batch_size`. Did you mean `batch_sizes`?"),
    ],
)
def test_config_errors_name_place_and_value(tiny_model_dir, override, expected):
    stages = [{"type": "evaluate"}, {"type": "benchmark", **override}]
    raw = {"name": "t", "model": str(tiny_model_dir), "stages": stages}
    with pytest.raises(RecipeError) as err:
        load_recipe(raw)
    assert "stages[1] (benchmark)" in str(err.value)
    assert expected in str(err.value)


def test_batch_sizes_are_sorted():
    assert BenchmarkStage(batch_sizes=[8, 1, 4]).batch_sizes == [1, 4, 8]


def test_stage_fills_every_figure(make_ctx):
    ctx = make_ctx(stages=[QUICK])
    result = ctx.recipe.stages[0].run(ctx)
    data = result.data
    assert result.type == "benchmark" and data["same_model"] is True
    s = data["settings"]
    assert (s["backend"], s["prompt_tokens"], s["new_tokens"], s["batch_sizes"]) == ("hf", 8, 4, [1, 2])
    assert s["threads"] == 1 and s["device"] == "cpu" and s["dtype"] == "bfloat16" and s["same_prompt_ids"]
    fig = data["original"]
    expected = {"size_bytes", "param_bytes", "load_s", "rss_load_bytes", "peak_rss_bytes", "peak_rss_model_bytes",
                "ttft_ms", "prefill_tok_s", "decode_tok_s_bs1", "decode_tok_s_bs2", "decode_ms_per_token_bs1"}
    assert set(fig) == expected
    assert all(v > 0 for v in fig.values()), fig
    assert fig["peak_rss_bytes"] >= fig["rss_load_bytes"] > fig["peak_rss_model_bytes"]
    assert fig["param_bytes"] <= fig["size_bytes"] * 1.1
    assert data["compressed"] == fig and all(r == 1.0 for r in data["ratios"].values())
    # The memory probe's own JSON is kept.
    mem = data["raw"]["memory"]["original"]
    assert mem["threads"] == 1 and mem["rss_base_bytes"] > 0
    assert mem["generate"]["new_tokens"] == 4 and mem["generate"]["prompt_tokens"] == 8
    # One warm-up call (smallest batch), then one call per (round, batch size); each internally consistent.
    calls = data["raw"]["calls"]
    assert len(calls) == 1 + 2 * 2
    for c in calls:
        assert 0 < c["ttft_s"] < c["total_s"] and 0 < c["decode_s"] < c["total_s"]
        assert c["ttft_s"] + c["decode_s"] <= c["total_s"] + 1e-6
    assert len(data["raw"]["per_repeat"]["original"]["ttft_ms"]) == 2
    assert fig["decode_ms_per_token_bs1"] == pytest.approx(1000 / fig["decode_tok_s_bs1"], rel=0.5)
    assert result.summary["decode bs1"].endswith("tok/s") and "size" in result.summary
    assert 0 < result.seconds

    import torch

    assert torch.get_num_threads() == 1  # the runtime's threads, set by the stage


def test_models_are_interleaved_call_by_call(make_ctx, tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    ctx = make_ctx(stages=[{**QUICK, "memory": False}], compressed=copy)
    result = ctx.recipe.stages[0].run(ctx)
    data = result.data
    order = [(c["phase"], c["repeat"], c["batch_size"], c["role"]) for c in data["raw"]["calls"]]
    expected = [("warmup", 0, 1, "original"), ("warmup", 0, 1, "compressed")]
    expected += [("timed", r, bs, role) for r in (0, 1) for bs in (1, 2) for role in ("original", "compressed")]
    assert order == expected
    assert data["same_model"] is False and "load_s" not in data["original"]
    assert set(data["ratios"]) == set(data["original"]) == set(data["compressed"])
    assert data["ratios"]["size_bytes"] == 1.0
    paired = data["raw"]["paired_ratios"]
    assert set(paired) == set(data["raw"]["per_repeat"]["original"]) and all(len(v) == 2 for v in paired.values())
    assert data["ratios"]["decode_tok_s_bs2"] == pytest.approx(sum(paired["decode_tok_s_bs2"]) / 2, abs=1e-3)
    assert " -> " in result.summary["decode bs2"] and result.summary["decode bs2"].endswith("x)")


def test_interleaving_records_call_order_with_fake_backends():
    log = []

    class Fake:
        def __init__(self, role):
            self.role = role

        def prompts(self, batch, tokens):
            return [[1] * tokens] * batch

        def generate(self, ids, new_tokens):
            log.append((self.role, len(ids)))
            return GenTiming(len(ids), len(ids[0]), new_tokens, ttft_s=0.01, decode_s=0.03, total_s=0.05)

    stage = BenchmarkStage(batch_sizes=[1, 4], repeats=3, warmup=1, prompt_tokens=4, new_tokens=4)
    calls = stage.time_interleaved({"original": Fake("o"), "compressed": Fake("c")})
    assert [r for r, _ in log] == ["o", "c"] * 7
    assert [b for _, b in log] == [1, 1] + [1, 1, 4, 4] * 3
    assert [c["phase"] for c in calls].count("warmup") == 2


def test_original_memory_probe_is_cached_across_runs(make_ctx, monkeypatch):
    import llmcompress.bench.memory as memory

    probes = []
    monkeypatch.setattr(memory, "measure_memory", lambda path, *a, **k: probes.append(path) or {
        "load_s": 0.5, "rss_base_bytes": 100, "rss_load_bytes": 150, "peak_rss_bytes": 200})
    stage = {**QUICK, "batch_sizes": [1], "prompt_tokens": 7, "repeats": 1, "warmup": 0}  # a key no other test uses
    first = make_ctx(stages=[stage])
    a = first.recipe.stages[0].run(first).data
    b = first.recipe.stages[0].run(first).data
    assert len(probes) == 1 and a["raw"]["memory"]["original"]["cached"] is False
    assert b["raw"]["memory"]["original"]["cached"] is True and b["original"]["peak_rss_model_bytes"] == 100


def test_prompt_too_long_for_model_fails_before_timing(make_ctx):
    ctx = make_ctx(stages=[{"type": "benchmark", "prompt_tokens": 1020, "new_tokens": 8, "memory": False}])
    with pytest.raises(RecipeError, match=r"stages\[0\] \(benchmark\): prompt_tokens \+ new_tokens = 1028 exceeds"):
        ctx.recipe.stages[0].run(ctx)


@pytest.mark.parametrize("kind", ["missing", "no-config"])
def test_memory_probe_fails_clearly_for_a_bad_folder(tmp_path, kind):
    from llmcompress.bench.memory import measure_memory

    folder = tmp_path / "nope"
    if kind == "no-config":
        folder.mkdir()
    with pytest.raises(LLMCompressError) as err:
        measure_memory(folder)
    msg = str(err.value)
    assert str(folder) in msg and "exit 2" in msg and "Fix:" in msg
    assert ("does not exist" if kind == "missing" else "has no config.json") in msg


def test_prompts_are_real_text_of_exact_length(tiny_model_dir):
    from transformers import AutoTokenizer

    from llmcompress.bench.prompts import prompt_ids

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = prompt_ids(tok, 4, 16)
    assert [len(r) for r in rows] == [16] * 4 and len({tuple(r) for r in rows}) == 4
    assert rows == prompt_ids(tok, 4, 16)
    assert any(c.isalpha() for c in tok.decode(rows[0]))


def test_gen_timing_math():
    t = GenTiming(batch_size=8, prompt_tokens=32, new_tokens=11, ttft_s=0.5, decode_s=2.0, total_s=2.6)
    assert t.prefill_tok_s == 8 * 32 / 0.5
    assert t.decode_tok_s == 8 * 10 / 2.0
    assert t.decode_ms_per_token == 200.0


def test_summary_lines():
    o = {"size_bytes": 2**20 * 100, "decode_tok_s_bs1": 40.0, "ttft_ms": 100.0}
    c = {"size_bytes": 2**20 * 25, "decode_tok_s_bs1": 50.0, "ttft_ms": 80.0}
    ratios = {"size_bytes": 0.25, "decode_tok_s_bs1": 1.3, "ttft_ms": None}  # timed ratios: median of pairs
    out = summarize({"original": o, "compressed": c}, ratios, same=False)
    assert out == {"size": "100.0 -> 25.0 MiB (0.25x)", "decode bs1": "40.0 -> 50.0 tok/s (1.30x)",
                   "TTFT": "100 -> 80 ms (n/a)"}
    assert summarize({"original": o, "compressed": o}, {}, same=True)["decode bs1"] == "40.0 tok/s"


def test_importing_the_stage_does_not_import_torch():
    code = "import sys, llmcompress.bench.stage, llmcompress.bench.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
