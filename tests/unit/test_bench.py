"""The benchmark stage on the tiny random llama: figures, interleaving, the memory probe, config errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from llmcompress.backends.base import GenTiming
from llmcompress.bench.stage import BenchmarkStage, _cross, _paired, _per_repeat, summarize
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
        ({"batch_sizes": [0, 8]}, "`batch_sizes`: batch sizes must be between 1 and 4096, got [0, 8]"),
        ({"batch_sizes": []}, "`batch_sizes`: needs at least one batch size"),
        ({"batch_sizes": [8, 8]}, "must be distinct"),
        ({"new_tokens": 1}, "`new_tokens`: must be >= 2"),
        ({"prompt_tokens": 0}, "`prompt_tokens`: must be >= 1, got 0"),
        ({"repeats": 0}, "`repeats`: must be >= 1, got 0"),
        ({"warmup": -1}, "`warmup`: must be >= 0"),
        ({"backend": "vllm2"}, "`backends.0`"), ({"backends": ["hf", "hf"]}, "distinct"),
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
    assert (s["backends"], s["prompt_tokens"], s["new_tokens"], s["batch_sizes"]) == (["hf"], 8, 4, [1, 2])
    assert s["threads"] == 1 and s["device"] == "cpu" and s["dtype"] == "bfloat16" and s["same_prompt_ids"]
    assert (s["ttft_batch_size"], s["latency_batch_size"]) == (1, 2)
    fig = data["original"]
    expected = {"size_bytes", "param_bytes", "load_s", "rss_load_bytes", "peak_rss_bytes", "peak_rss_model_bytes",
                "ttft_ms", "prefill_tok_s", "decode_tok_s_bs1", "decode_tok_s_bs2", "decode_ms_per_token_bs1",
                "output_tok_s_bs1", "output_tok_s_bs2", "requests_per_s_bs1", "requests_per_s_bs2",
                "ttft_p50_ms_bs2", "ttft_p95_ms_bs2", "itl_p50_ms_bs2", "itl_p95_ms_bs2"}
    assert set(fig) == expected
    assert all(v > 0 for v in fig.values()), fig
    assert fig["peak_rss_bytes"] >= fig["rss_load_bytes"] > fig["peak_rss_model_bytes"]
    assert fig["param_bytes"] <= fig["size_bytes"] * 1.1
    assert fig["ttft_p50_ms_bs2"] <= fig["ttft_p95_ms_bs2"] and fig["itl_p50_ms_bs2"] <= fig["itl_p95_ms_bs2"]
    # Offline throughput counts prefill too: the call's 4 tokens over more time than the 3 decode steps took.
    assert fig["output_tok_s_bs2"] < fig["decode_tok_s_bs2"] * 4 / 3
    assert fig["requests_per_s_bs2"] == pytest.approx(fig["output_tok_s_bs2"] / 4, rel=0.05)
    assert data["compressed"] == fig and all(r == 1.0 for r in data["ratios"].values())
    # The first backend fills the top-level tables; its block holds the same figures plus the engine.
    hf = data["backends"]["hf"]
    assert set(data["backends"]) == {"hf"} and hf["figures"]["original"] == fig and hf["unsupported"] == {}
    assert hf["engine"]["engine"].startswith("transformers ") and hf["engine"]["threads"] == 1
    assert hf["ratios"]["compressed"] == data["ratios"] and data["cross"] == {}
    # The memory probe's own JSON is kept.
    mem = data["raw"]["memory"]["hf/original"]
    assert mem["threads"] == 1 and mem["rss_base_bytes"] > 0
    assert mem["generate"]["new_tokens"] == 4 and mem["generate"]["prompt_tokens"] == 8
    # One warm-up call (smallest batch), then one call per (round, batch size); each internally consistent.
    calls = data["raw"]["calls"]
    assert len(calls) == 1 + 2 * 2
    for c in calls:
        assert 0 < c["ttft_s"] < c["total_s"] and 0 < c["decode_s"] < c["total_s"]
        assert c["ttft_s"] + c["decode_s"] <= c["total_s"] + 1e-6
    assert {c["role"] for c in calls} == {"hf/original"}
    assert len(data["raw"]["per_repeat"]["hf/original"]["ttft_ms"]) == 2
    assert fig["decode_ms_per_token_bs1"] == pytest.approx(1000 / fig["decode_tok_s_bs1"], rel=0.5)
    assert result.summary["decode bs1"].endswith("tok/s") and "size" in result.summary
    assert 0 < result.seconds

    import torch

    assert torch.get_num_threads() == 1  # the runtime's threads, set by the stage


@pytest.mark.parametrize("paired", ["calls", "rounds"])
def test_models_are_interleaved_call_by_call_or_round_by_round(make_ctx, tiny_model_dir, tmp_path, monkeypatch,
                                                               paired):
    from llmcompress.backends.hf import HFBackend

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    ctx = make_ctx(stages=[{**QUICK, "memory": False, "paired": paired}], compressed=copy)
    ctx.original.load(), ctx.current.load()  # as an earlier stage may leave them
    in_memory, generate = [], HFBackend.generate

    def counting(self, *a, **k):
        in_memory.append(sum(h._loaded is not None for h in (ctx.original, ctx.current)))
        return generate(self, *a, **k)

    monkeypatch.setattr(HFBackend, "generate", counting)
    result = ctx.recipe.stages[0].run(ctx)
    data = result.data
    order = [(c["phase"], c["repeat"], c["batch_size"], c["role"]) for c in data["raw"]["calls"]]
    roles = ("hf/original", "hf/compressed")
    expected = [("warmup", 0, 1, role) for role in roles]
    if paired == "calls":
        expected += [("timed", r, bs, role) for r in (0, 1) for bs in (1, 2) for role in roles]
        assert set(in_memory) == {2} and len(in_memory) == len(expected)
    else:  # one model in memory for every call; each reload before a timed round gets one untimed call
        expected += [("timed", r, bs, role) for r in (0, 1) for role in roles for bs in (1, 2)]
        assert set(in_memory) == {1} and len(in_memory) == len(expected) + 2 * 2
    assert order == expected and data["settings"]["paired"] == paired
    assert data["same_model"] is False and "load_s" not in data["original"]
    assert set(data["ratios"]) == set(data["original"]) == set(data["compressed"])
    assert data["ratios"]["size_bytes"] == 1.0
    per_repeat = data["raw"]["per_repeat"]
    paired = _paired(per_repeat["hf/original"], per_repeat["hf/compressed"])
    assert set(paired) == set(per_repeat["hf/original"]) and all(len(v) == 2 for v in paired.values())
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

    stage = BenchmarkStage(batch_sizes=[1, 4], repeats=3, warmup=1, prompt_tokens=4, new_tokens=4, paired="calls")
    fakes = {"hf/original": Fake("o"), "hf/compressed": Fake("c"), "vllm/original": Fake("v")}
    calls = stage.time_interleaved(fakes)
    assert [r for r, _ in log] == ["o", "c", "v"] * 7
    assert [b for _, b in log] == [1] * 3 + ([1] * 3 + [4] * 3) * 3
    assert [c["phase"] for c in calls].count("warmup") == 3
    assert [c["role"] for c in calls[:3]] == ["hf/original", "hf/compressed", "vllm/original"]

    log.clear()  # round by round: each model runs all batch sizes of a round in turn (no suspend: no reloads)
    calls = stage.model_copy(update={"paired": "rounds"}).time_interleaved(fakes)
    assert log == [("o", 1), ("c", 1), ("v", 1)] + [(r, b) for r in "ocv" for b in (1, 4)] * 3
    assert len(calls) == len(log)


def _call(role: str, bs: int, total_s: float, phase: str = "timed", repeat: int = 0) -> dict:
    t = GenTiming(bs, 4, 5, ttft_s=total_s / 5, decode_s=total_s * 0.8, total_s=total_s,
                  ttfts_s=tuple(total_s / 5 * (i + 1) for i in range(bs)), itls_s=(total_s / 5,) * (4 * bs))
    return {"phase": phase, "repeat": repeat, "role": role, **t.as_dict()}


def test_per_repeat_figures_by_batch_size():
    calls = [_call("hf/original", 1, 9.0, phase="warmup")]  # warm-up calls never count
    calls += [_call(role, bs, total * r, repeat=r) for r in (1, 2) for bs, total in ((1, 1.0), (4, 2.0))
              for role in ("hf/original", "vllm/original")]
    out = _per_repeat(calls, "hf/original", [1, 4])
    assert set(out) == {"ttft_ms", "prefill_tok_s", "decode_ms_per_token_bs1", "decode_tok_s_bs1", "decode_tok_s_bs4",
                        "output_tok_s_bs1", "output_tok_s_bs4", "requests_per_s_bs1", "requests_per_s_bs4",
                        "ttft_p50_ms_bs4", "ttft_p95_ms_bs4", "itl_p50_ms_bs4", "itl_p95_ms_bs4"}
    assert all(len(v) == 2 for v in out.values())  # one value per timed round, this role only
    assert out["output_tok_s_bs4"] == [10.0, 5.0] and out["requests_per_s_bs1"] == [1.0, 0.5]
    assert out["ttft_ms"] == [200.0, 400.0] and out["itl_p50_ms_bs4"] == [400.0, 800.0]
    assert out["ttft_p50_ms_bs4"] == [1000.0, 2000.0] and out["ttft_p95_ms_bs4"] == [1540.0, 3080.0]


def test_cross_backend_ratios_are_paired_throughput_only():
    calls = [_call(role, 2, total * r, repeat=r) for r in (1, 2)
             for role, total in (("hf/original", 2.0), ("hf/compressed", 1.0), ("vllm/original", 0.5))]
    per_repeat = {k: _per_repeat(calls, k, [2]) for k in ("hf/original", "hf/compressed", "vllm/original")}
    cross = _cross(per_repeat, ["hf", "vllm"], ["original", "compressed"])
    # vllm/compressed was not served (not in per_repeat): its pairs are left out, not reported as None.
    assert list(cross) == ["vllm/original vs hf/original"]
    figs = cross["vllm/original vs hf/original"]
    assert set(figs) == {"prefill_tok_s", "decode_tok_s_bs2", "output_tok_s_bs2", "requests_per_s_bs2"}
    assert figs["output_tok_s_bs2"] == 4.0 and figs["requests_per_s_bs2"] == 4.0
    per_repeat["vllm/compressed"] = per_repeat["hf/compressed"]
    cross = _cross(per_repeat, ["hf", "vllm"], ["original", "compressed"])
    assert set(cross) == {"vllm/original vs hf/original", "vllm/compressed vs hf/compressed",
                          "vllm/compressed vs hf/original"}
    assert cross["vllm/compressed vs hf/original"]["output_tok_s_bs2"] == 2.0


def test_original_memory_probe_is_cached_across_runs(make_ctx, monkeypatch):
    import llmcompress.bench.memory as memory

    probes = []
    monkeypatch.setattr(memory, "measure_memory", lambda path, *a, **k: probes.append(path) or {
        "load_s": 0.5, "rss_base_bytes": 100, "rss_load_bytes": 150, "peak_rss_bytes": 200})
    stage = {**QUICK, "batch_sizes": [1], "prompt_tokens": 7, "repeats": 1, "warmup": 0}  # a key no other test uses
    first = make_ctx(stages=[stage])
    a = first.recipe.stages[0].run(first).data
    b = first.recipe.stages[0].run(first).data
    assert len(probes) == 1 and a["raw"]["memory"]["hf/original"]["cached"] is False
    assert b["raw"]["memory"]["hf/original"]["cached"] is True and b["original"]["peak_rss_model_bytes"] == 100


def test_prompt_too_long_for_model_fails_before_timing(make_ctx):
    ctx = make_ctx(stages=[{"type": "benchmark", "prompt_tokens": 1020, "new_tokens": 8, "memory": False}])
    # The stage names itself; run_recipe prefixes the recipe file and stage index.
    with pytest.raises(RecipeError, match=r"benchmark\)?: prompt_tokens \+ new_tokens = 1028 exceeds .* Fix: "):
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

    from llmcompress.backends.prompts import prompt_ids

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = prompt_ids(tok, 4, 16)
    assert [len(r) for r in rows] == [16] * 4 and len({tuple(r) for r in rows}) == 4
    assert rows == prompt_ids(tok, 4, 16)
    assert any(c.isalpha() for c in tok.decode(rows[0]))


def test_gen_timing_math():
    t = GenTiming(batch_size=8, prompt_tokens=32, new_tokens=11, ttft_s=0.5, decode_s=2.0, total_s=2.6)
    assert t.prefill_tok_s == 8 * 32 / 0.5
    assert t.decode_tok_s == 8 * 10 / 2.0
    assert t.output_tok_s == pytest.approx(8 * 11 / 2.6) and t.requests_s == pytest.approx(8 / 2.6)


def test_summary_lines():
    o = {"size_bytes": 2**20 * 100, "decode_tok_s_bs1": 40.0, "ttft_ms": 100.0}
    c = {"size_bytes": 2**20 * 25, "decode_tok_s_bs1": 50.0, "ttft_ms": 80.0}
    ratios = {"size_bytes": 0.25, "decode_tok_s_bs1": 1.3, "ttft_ms": None}  # timed ratios: median of pairs
    out = summarize(o, c, ratios, same=False)
    assert out == {"size": "100.0 -> 25.0 MiB (0.25x)", "decode bs1": "40.0 -> 50.0 tok/s (1.30x)",
                   "TTFT": "100 -> 80 ms (n/a)"}
    assert summarize(o, o, {}, same=True)["decode bs1"] == "40.0 tok/s"
    # a compressed model the table's backend could not run (transformers and a GGUF file): said, not a KeyError
    assert summarize(o, {}, {}, same=False)["decode bs1"] == "40.0 -> not measured tok/s"


def test_importing_the_stage_does_not_import_torch():
    code = "import sys, llmcompress.bench.stage, llmcompress.bench.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_compare_entries_are_named_after_their_run_or_their_own_folder(tmp_path):
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from llmcompress.bench.stage import _resolve_compare

    plain = tmp_path / "home" / "models" / "Qwen"
    plain.mkdir(parents=True)
    (plain / "config.json").write_text('{"model_type": "llama"}')
    run = tmp_path / "runs" / "w8a8"
    model = run / "01-quantize" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (run / "01-quantize" / "result.json").write_text(json.dumps({"result": {"model_dir": "model"}}))
    (run / "manifest.json").write_text(json.dumps({"stages": [{"dir": "01-quantize"}]}))
    ctx = SimpleNamespace(recipe=SimpleNamespace(resolve_path=Path))
    assert _resolve_compare(ctx, str(plain), "compare[0]") == ("Qwen", plain)  # not `home`, its grandparent
    assert _resolve_compare(ctx, str(run), "compare[0]") == ("w8a8", model)
    assert _resolve_compare(ctx, str(model), "compare[0]") == ("w8a8", model)  # a run's stage model: the run
