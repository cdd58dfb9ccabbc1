"""Generation backends and the vLLM plumbing that needs no vLLM process: timing math, the hf backend on the tiny
model, which folders vLLM is refused, server command lines, finding vLLM's interpreter, config blocks."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from llmcompress.backends.base import GenTiming, percentile
from llmcompress.errors import LLMCompressError, RecipeError
from llmcompress.serving import runtime as vllm_runtime
from llmcompress.serving import support
from llmcompress.serving.config import VLLMConfig
from llmcompress.serving.server import ServerOptions, VLLMServer
from tests.unit.proc_helpers import in_session

# --- timing math ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy(n, q):
    values = [random.Random(n).uniform(0, 10) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)


def test_percentile_of_nothing_raises():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_gen_timing_figures():
    t = GenTiming(batch_size=4, prompt_tokens=16, new_tokens=9, ttft_s=0.2, decode_s=1.6, total_s=2.0,
                  ttfts_s=(0.1, 0.2, 0.3, 0.4), itls_s=(0.1,) * 30 + (0.5, 0.5))
    assert t.output_tok_s == pytest.approx(4 * 9 / 2.0)  # prefill included: offline throughput
    assert t.requests_s == pytest.approx(4 / 2.0)
    assert t.decode_tok_s == pytest.approx(4 * 8 / 1.6) and t.prefill_tok_s == pytest.approx(4 * 16 / 0.2)
    lat = t.latency()
    assert lat["ttft_p50_s"] == pytest.approx(0.25) and lat["ttft_p95_s"] == pytest.approx(0.385)
    assert lat["itl_p50_s"] == pytest.approx(0.1) and lat["itl_p95_s"] == pytest.approx(np.percentile(t.itls_s, 95))
    assert lat["itl_mean_s"] == pytest.approx((30 * 0.1 + 1.0) / 32)
    d = t.as_dict()
    assert "ttfts_s" not in d and "itls_s" not in d  # per-request lists stay out of the per-call record
    assert d["output_tok_s"] == 18.0 and d["requests_s"] == 2.0 and d["ttft_p95_s"] == 0.385


def test_gen_timing_latency_without_per_request_times():
    """A backend that records no per-request times: TTFT is the batch's, ITL the mean decode step."""
    lat = GenTiming(batch_size=2, prompt_tokens=8, new_tokens=5, ttft_s=0.3, decode_s=0.8, total_s=1.2).latency()
    assert lat["ttft_p50_s"] == lat["ttft_p95_s"] == 0.3
    assert lat["itl_p50_s"] == lat["itl_p95_s"] == lat["itl_mean_s"] == pytest.approx(0.2)


def test_backends_registry():
    from llmcompress.backends import BACKENDS
    from llmcompress.backends.hf import HFBackend
    from llmcompress.backends.vllm import VLLMBackend

    assert BACKENDS.get("hf") is HFBackend and BACKENDS.get("vllm") is VLLMBackend
    assert HFBackend.name == "hf" and VLLMBackend.name == "vllm"
    with pytest.raises(RecipeError, match="Did you mean `vllm`"):
        BACKENDS.get("vlm")


# --- the hf backend on the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    from llmcompress.backends.hf import HFBackend
    from llmcompress.context import ModelHandle, Runtime

    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    runtime.apply()
    handle = ModelHandle("original", tiny_model_dir, runtime)
    with HFBackend.open(handle) as backend:
        yield backend
    handle.release()


def test_hf_generate_exact_tokens_and_per_request_timings(hf_backend):
    ids = hf_backend.prompts(3, 8)
    assert [len(r) for r in ids] == [8, 8, 8]
    t = hf_backend.generate(ids, 5)
    assert (t.batch_size, t.prompt_tokens, t.new_tokens) == (3, 8, 5)
    assert 0 < t.ttft_s < t.total_s and 0 < t.decode_s < t.total_s and t.ttft_s + t.decode_s <= t.total_s + 1e-6
    # Static batching: every request of the batch sees the batch's TTFT and every decode step.
    assert t.ttfts_s == (t.ttft_s,) * 3
    assert len(t.itls_s) == 3 * (5 - 1) and all(x > 0 for x in t.itls_s)
    assert sum(t.itls_s) == pytest.approx(3 * t.decode_s)


def test_hf_check_describe_memory(hf_backend):
    hf_backend.check(1000, 24, where="here")
    with pytest.raises(RecipeError, match=r"here: prompt_tokens \+ new_tokens = 1025 exceeds .*max_position_emb"):
        hf_backend.check(1000, 25, where="here")
    d = hf_backend.describe()
    assert d["engine"].startswith("transformers ") and d["dtype"] == "float32" and d["threads"] == 1
    assert hf_backend.param_bytes() > 0 and hf_backend.memory() is None


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9}], ids=["greedy", "sampled"])
def test_hf_chat_streams_text_pieces(hf_backend, sampling):
    pieces = list(hf_backend.chat([{"role": "user", "content": "What is a list?"}], max_new_tokens=8, **sampling))
    assert pieces and all(isinstance(p, str) and p for p in pieces)


def test_hf_chat_raises_the_generate_error_in_the_caller(hf_backend, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(hf_backend.model, "generate", boom)
    with pytest.raises(RuntimeError, match="out of cheese"):
        list(hf_backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=4))


# --- which folders vLLM can serve ----------------------------------------------------------------------------------

DENSE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 2,
         "max_position_embeddings": 512}
CT_W4A16 = {"quant_method": "compressed-tensors",
            "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}, "input_activations": None}}}
CT_W8A8 = {"quant_method": "compressed-tensors", "config_groups": {
    "group_0": {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int"}}}}
CT_FP8 = {"quant_method": "compressed-tensors", "config_groups": {
    "group_0": {"weights": {"num_bits": 8, "type": "float"}, "input_activations": {"num_bits": 8, "type": "float"}}}}


def _folder(root: Path, name: str, config: dict | None = None, meta: dict | None = None, **config_kw) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps({**config, **config_kw}))
    if meta is not None:
        (folder / "llmcompress.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def no_avx512(monkeypatch):
    # cpu_flags is lru_cached: replace the function, never its cached value, so other tests see the real flags.
    monkeypatch.setattr(support, "cpu_flags", lambda: frozenset({"sse4_2", "avx2"}))


@pytest.mark.parametrize("fmt", ["rtn", "hqq", "dynamic-int8"])
def test_refuses_llmcompress_own_formats(tmp_path, fmt):
    folder = _folder(tmp_path, fmt, DENSE, meta={"format": fmt})
    why = support.unservable_reason(folder, "cuda")
    assert f"llmcompress's own `{fmt}` format" in why and str(folder) in why and "Fix:" in why
    # a fix that works for every one of them (compressed-tensors cannot hold hqq's float zero points)
    assert "`format: hf` and `dequantize: true`" in why


def test_refuses_a_folder_without_config(tmp_path):
    why = support.unservable_reason(_folder(tmp_path, "empty"), "cpu")
    assert "has no config.json" in why and "Fix:" in why


@pytest.mark.parametrize("config, words", [
    ({"architectures": ["ViTForImageClassification"], "model_type": "vit"}, "an image model (image-classification)"),
    ({"architectures": ["LlavaForConditionalGeneration"], "vision_config": {}, "text_config": DENSE},
     "a vision-language model"),
])
def test_refuses_vision_models(tmp_path, config, words):
    why = support.unservable_reason(_folder(tmp_path, "v", config), "cuda")
    assert words in why and "causal LMs only" in why and "Fix: use the hf backend" in why


def test_a_corrupt_config_is_a_reason_not_a_traceback(tmp_path):
    folder = _folder(tmp_path, "bad")
    (folder / "config.json").write_text("{bad")
    why = support.unservable_reason(folder, "cpu")
    assert "config.json of" in why and "not valid JSON (line 1)" in why and "Fix:" in why


def test_refuses_cpu_head_sizes_vllm_cpu_lacks(tmp_path):
    folder = _folder(tmp_path, "h50", DENSE, hidden_size=100)  # 100 / 2 heads = head size 50
    why = support.unservable_reason(folder, "cpu")
    assert "attention heads of size 50" in why and "Fix:" in why
    assert support.unservable_reason(folder, "cuda") is None
    explicit = _folder(tmp_path, "hd", DENSE, head_dim=48)
    assert "size 48" in support.unservable_reason(explicit, "cpu")


def test_refuses_bitsandbytes_on_cpu(tmp_path):
    folder = _folder(tmp_path, "bnb", DENSE, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    why = support.unservable_reason(folder, "cpu")
    assert "bitsandbytes-quantized" in why and "CUDA only" in why
    assert support.unservable_reason(folder, "cuda") is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_refuses_asymmetric_gptq(tmp_path, device, monkeypatch):
    monkeypatch.setattr(support, "cpu_flags", lambda: frozenset({"avx512f"}))
    folder = _folder(tmp_path, "gptq", DENSE, quantization_config={"quant_method": "gptq", "bits": 4, "sym": False})
    assert "sym=False" in support.unservable_reason(folder, device)
    sym = _folder(tmp_path, "gptq-sym", DENSE, quantization_config={"quant_method": "gptq", "bits": 4, "sym": True})
    assert support.unservable_reason(sym, device) is None


def _torchao_qc(kind: str) -> dict:
    return {"quant_method": "torchao", "quant_type": {"default": {"_type": kind, "_version": 2, "_data": {}}}}


@pytest.mark.parametrize("kind", ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"])
def test_serves_torchao_int8_on_cpu(tmp_path, kind):
    folder = _folder(tmp_path, "ao", DENSE, meta={"format": "torchao", "torchao": {"layout": "hf"}},
                     quantization_config=_torchao_qc(kind))
    assert support.unservable_reason(folder, "cpu") is None and support.unservable_reason(folder, "cuda") is None


def test_refuses_other_torchao_configs_on_cpu(tmp_path):
    folder = _folder(tmp_path, "ao", DENSE, quantization_config=_torchao_qc("Float8WeightOnlyConfig"))
    why = support.unservable_reason(folder, "cpu")
    assert "torchao Float8WeightOnlyConfig" in why and "Fix: use torchao-int8wo" in why
    assert support.unservable_reason(folder, "cuda") is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_refuses_the_plain_int4_torchao_layout(tmp_path, device):
    folder = _folder(tmp_path, "int4", DENSE, meta={"format": "torchao", "torchao": {"layout": "int4-plain"}})
    why = support.unservable_reason(folder, device)
    assert "plain-int4 layout" in why and "`dequantize: true`" in why


@pytest.mark.parametrize("qc, name", [
    (CT_W4A16, "W4A16"),
    ({"quant_method": "gptq", "bits": 4, "sym": True}, "gptq-w4"),
    ({"quant_method": "awq", "bits": 4}, "awq-w4"),
])
def test_refuses_4bit_weight_only_on_cpu_without_avx512(tmp_path, no_avx512, qc, name):
    folder = _folder(tmp_path, name, DENSE, quantization_config=qc)
    assert support.scheme(folder) == name
    why = support.unservable_reason(folder, "cpu")
    assert f"is {name} (4-bit weights" in why and "AVX-512" in why and "Fix:" in why
    assert support.unservable_reason(folder, "cuda") is None


def test_4bit_weight_only_is_served_on_an_avx512_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(support, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert support.unservable_reason(_folder(tmp_path, "w4", DENSE, quantization_config=CT_W4A16), "cpu") is None


def test_4bit_weight_only_needs_bf16_or_fp16_activations_on_cpu(tmp_path, monkeypatch):
    """Measured: vllm-cpu 0.32's cpu_gemm_wna16 is "not implemented for 'Float'" (the engine dies at once)."""
    monkeypatch.setattr(support, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    folder = _folder(tmp_path, "w4", DENSE, quantization_config=CT_W4A16)
    why = support.unservable_reason(folder, "cpu", "float32")
    assert "is W4A16 (4-bit weights)" in why and "bf16 or fp16" in why and "Fix: set the recipe's `dtype:" in why
    for ok in ("bfloat16", "float16", "auto", None):
        assert support.unservable_reason(folder, "cpu", ok) is None
    assert support.unservable_reason(folder, "cuda", "float32") is None
    with pytest.raises(support.Unservable, match="float32 the engine dies"):
        support.require_servable(folder, "cpu", "here", dtype="float32")


def test_refuses_fp8_on_cpu_serves_int8(tmp_path, no_avx512):
    fp8 = _folder(tmp_path, "fp8", DENSE, quantization_config=CT_FP8)
    assert support.scheme(fp8) == "W8A8-FP" and "FP8" in support.unservable_reason(fp8, "cpu")
    w8a8 = _folder(tmp_path, "w8a8", DENSE, quantization_config=CT_W8A8)
    assert support.scheme(w8a8) == "W8A8" and support.unservable_reason(w8a8, "cpu") is None


def test_peft_folder_is_judged_by_its_base(tmp_path):
    lonely = _folder(tmp_path, "lonely", meta={"format": "peft"})
    assert "no base/ folder" in support.unservable_reason(lonely, "cpu")
    good = _folder(tmp_path, "good", meta={"format": "peft"})
    _folder(good, "base", DENSE)
    assert support.unservable_reason(good, "cpu") is None
    assert support.adapter_base(good) == (good / "base", good)
    bad = _folder(tmp_path, "bad", meta={"format": "peft"})
    _folder(bad, "base", DENSE, meta={"format": "rtn"})
    why = support.unservable_reason(bad, "cpu")
    assert why.startswith(f"LoRA adapter `{bad}`: its base cannot be served:") and "`rtn` format" in why


def test_tiny_model_is_servable_on_cpu(tiny_model_dir):
    assert support.scheme(tiny_model_dir) == "dense"
    assert support.unservable_reason(tiny_model_dir, "cpu") is None
    assert support.adapter_base(tiny_model_dir) == (Path(tiny_model_dir), None)


def test_cpu_flags_reads_this_machine():
    flags = support.cpu_flags()
    assert isinstance(flags, frozenset) and support.cpu_flags() is flags  # cached
    if Path("/proc/cpuinfo").is_file():
        assert flags and ("avx2" in flags or not any(f.startswith("avx") for f in flags))


def _command(server: VLLMServer) -> list[str]:
    server.python = sys.executable  # no vLLM lookup needed to build the command line
    return server.command()


def _after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_make_server_refuses_before_starting(tmp_path):
    from llmcompress.backends.vllm import make_server
    from llmcompress.serving.support import Unservable

    with pytest.raises(Unservable, match="`rtn` format"):
        make_server(_folder(tmp_path, "rtn", DENSE, meta={"format": "rtn"}), ServerOptions(), None)


def test_make_server_serves_a_peft_folder_as_base_plus_lora(tmp_path):
    from llmcompress.backends.vllm import ADAPTER_NAME, make_server

    folder = _folder(tmp_path, "lora", meta={"format": "peft"})
    _folder(folder, "base", DENSE)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 128}))
    server = make_server(folder, ServerOptions(), None)
    assert server.model == folder / "base" and server.adapters == {ADAPTER_NAME: folder}
    assert server.options.max_lora_rank == 128 and server.proc is None  # not started
    cmd = _command(server)
    assert "--enable-lora" in cmd and f"{ADAPTER_NAME}={folder}" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "128"


@pytest.mark.parametrize("r, expected", [(1, 8), (8, 8), (16, 16), (17, 32), (100, 128), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_what_vllm_accepts(tmp_path, r, expected):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
    assert support.max_lora_rank(tmp_path) == expected and expected in support.LORA_RANKS


def test_max_lora_rank_counts_the_rank_pattern(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 48}}))
    assert support.max_lora_rank(tmp_path) == 64


@pytest.mark.parametrize("text, expected", [
    (None, r"cannot read adapter_config.json"),
    ("{bad", r"adapter_config.json is not valid JSON"),
    ('{"lora_alpha": 16}', r"no positive integer rank `r` \(got None\)"),
    ('{"r": 513}', r"rank 513; vLLM serves LoRA ranks up to 512. Fix: train with `r` <= 512"),
])
def test_max_lora_rank_refuses_clearly(tmp_path, text, expected):
    if text is not None:
        (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(LLMCompressError, match=expected) as err:
        support.max_lora_rank(tmp_path)
    assert str(tmp_path) in str(err.value) and "Fix:" in str(err.value)


def test_lm_eval_model_args_round_the_lora_rank_and_pass_max_num_seqs(tmp_path):
    from llmcompress.context import Runtime
    from llmcompress.eval.vllm import model_args

    folder = _folder(tmp_path, "lora", meta={"format": "peft"})
    _folder(folder, "base", DENSE)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 24}))
    args = model_args(folder, Runtime(device="cpu", threads=1, dtype="float32", seed=0), VLLMConfig(max_num_seqs=4))
    assert args["max_lora_rank"] == 32 and args["lora_local_path"] == str(folder) and args["max_num_seqs"] == 4


def test_lm_eval_child_is_online_only_for_hub_tasks(monkeypatch):
    from llmcompress.context import Runtime
    from llmcompress.eval.tasks import local_tasks
    from llmcompress.eval.vllm import child_env

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    local = sorted(local_tasks())[0]
    env = child_env(runtime, VLLMConfig(), [local])
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"  # local data: stay offline
    env = child_env(runtime, VLLMConfig(), [local, "arc_easy"])  # lm-eval's own task: its data is on the hub
    assert "HF_HUB_OFFLINE" not in env and "HF_DATASETS_OFFLINE" not in env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_lm_eval_child_runs_vllm_in_its_own_process_on_one_cpu_worker(monkeypatch):
    """vllm.LLM in lm-eval's child keeps engine and worker in that process on CPU with one worker (measured: the
    tiny model's vLLM-vs-transformers evaluation test 56.0 s -> 33.5 s); a split model or CUDA is left to vLLM."""
    from llmcompress.context import Runtime
    from llmcompress.eval.tasks import local_tasks
    from llmcompress.eval.vllm import child_env

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    tasks = [sorted(local_tasks())[0]]
    cpu = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    assert child_env(cpu, VLLMConfig(), tasks)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in child_env(cpu, VLLMConfig(tensor_parallel_size=2), tasks)
    cuda = Runtime(device="cuda", threads=1, dtype="float32", seed=0)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in child_env(cuda, VLLMConfig(), tasks)


# --- server options and command line -------------------------------------------------------------------------------


def test_server_options_args():
    args = ServerOptions(dtype="float32", max_model_len=256, seed=3).args()
    assert _after(args, "--dtype") == "float32" and _after(args, "--max-model-len") == "256"
    assert _after(args, "--seed") == "3" and "--enforce-eager" in args
    assert not any(a.startswith(("--tensor-parallel", "--pipeline-parallel", "--gpu-memory")) for a in args)
    assert "--no-enable-prefix-caching" not in args

    args = ServerOptions(enforce_eager=False, prefix_caching=False, tensor_parallel_size=2, pipeline_parallel_size=2,
                         extra_args=("--foo", "1")).args()
    assert "--enforce-eager" not in args and "--no-enable-prefix-caching" in args
    assert _after(args, "--tensor-parallel-size") == "2" and _after(args, "--pipeline-parallel-size") == "2"
    assert args[-2:] == ["--foo", "1"]  # extra arguments come last, so they win
    assert _after(ServerOptions(device="cuda", gpu_memory_utilization=0.5).args(), "--gpu-memory-utilization") == "0.5"


def test_one_cpu_worker_runs_inside_the_engine_process(tmp_path):
    """On CPU with one worker, vLLM gets the uniprocess executor and the environment variable without which vllm-cpu
    replaces it by its multiprocess one; a split model, CUDA and a user's own executor are left to vLLM."""
    one = VLLMServer(tmp_path, ServerOptions(), python="python")
    assert _after(one.command(), "--distributed-executor-backend") == "uni"
    assert one.child_env()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in ServerOptions().env()  # lm-eval's and vllm bench's: unchanged
    for options in (ServerOptions(tensor_parallel_size=2), ServerOptions(device="cuda"),
                    ServerOptions(extra_args=("--distributed-executor-backend", "mp"))):
        server = VLLMServer(tmp_path, options, python="python")
        assert server.command().count("--distributed-executor-backend") == len(options.extra_args) // 2
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in server.child_env()


def test_server_options_env():
    env = ServerOptions(threads=3, kv_cache_gib=2).env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["OMP_NUM_THREADS"] == "3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["HF_HUB_OFFLINE"] == "1"
    assert ServerOptions(kv_cache_gib=1.0).env()["VLLM_CPU_KVCACHE_SPACE"] == "1"  # int(): what vllm-cpu parses
    cuda = ServerOptions(device="cuda").env()
    assert not any(k.startswith("VLLM_CPU") for k in cuda) and "OMP_NUM_THREADS" not in cuda


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An executable that stands in for vLLM's python: it ignores its arguments and runs ``body``."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport os, subprocess, sys, time\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("leader", ["dies", "lives"])
def test_close_stops_every_process_of_the_session(tmp_path, leader):
    # vLLM's engine core is a child of the API server: when the server dies first (start-up failure, OOM), the
    # engine must not survive it. The fake server starts `sleep 300` in its session, then exits (or sleeps too).
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    body = (f"child = subprocess.Popen(['sleep', '300'])\nopen({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            + ("sys.exit(3)" if leader == "dies" else "time.sleep(300)"))
    server = VLLMServer(tmp_path, ServerOptions(), log_path=tmp_path / "log", python=str(_fake_python(tmp_path, body)))
    try:
        if leader == "dies":
            with pytest.raises(LLMCompressError, match=r"exited during start-up \(exit 3\)"):
                server.wait_ready(timeout_s=60)  # closes the server before it raises
        else:
            server.start()
            for _ in range(100):
                if pid_file.is_file() and pid_file.read_text():
                    break
                time.sleep(0.1)
            server.close(grace_s=5)
        assert pid_file.read_text()  # the child was started
        assert in_session(server.proc.pid) == []
        assert server.proc.poll() is not None
        server.close()  # twice is fine
    finally:
        if pid_file.is_file() and pid_file.read_text():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_start_with_a_python_that_cannot_run_fails_clearly(tmp_path):
    import os

    python = tmp_path / "python"
    python.write_text("")  # not executable
    server = VLLMServer(tmp_path, ServerOptions(), log_path=tmp_path / "log", python=str(python))
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    with pytest.raises(LLMCompressError, match=r"cannot run `.*python` \(Permission denied\)\. Fix: point "):
        server.start()
    assert server.proc is None
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds  # the log's handle is closed


def test_vllm_and_llama_server_share_one_process_manager_and_drop_an_inherited_key(tmp_path, monkeypatch):
    # one process manager (start, /health, process-group shutdown, RSS) under both servers; each hands its key over
    # through its own variable, and an inherited one would lock our own clients out
    from llmcompress.llamacpp.server import LlamaServer, LlamaServerOptions
    from llmcompress.serving.process import ServerProcess

    monkeypatch.setenv("VLLM_API_KEY", "inherited")
    monkeypatch.setenv("LLAMA_API_KEY", "inherited")
    assert issubclass(VLLMServer, ServerProcess) and issubclass(LlamaServer, ServerProcess)
    assert "VLLM_API_KEY" not in VLLMServer(tmp_path, ServerOptions()).child_env()
    assert "LLAMA_API_KEY" not in LlamaServer(tmp_path / "m.gguf", LlamaServerOptions()).child_env()
    keyed = LlamaServer(tmp_path / "m.gguf", LlamaServerOptions(api_key="k"))
    assert keyed.child_env()["LLAMA_API_KEY"] == "k" and keyed.options.headers() == {"Authorization": "Bearer k"}
    assert "k" not in keyed.options.args()
    with pytest.raises(LLMCompressError, match=r"keep llama-server's log \(this one was not kept\)"):
        monkeypatch.setattr(LlamaServer, "command", lambda self: [sys.executable, "-c", "import sys; sys.exit(2)"])
        keyed.wait_ready(timeout_s=30)


@pytest.mark.parametrize("gib", [0.5, 1.5, 0])
def test_server_options_refuse_a_kv_cache_vllm_cpu_cannot_read(gib):
    # vllm-cpu 0.32.0 reads VLLM_CPU_KVCACHE_SPACE with int(): "0.5" stopped the engine at start-up.
    with pytest.raises(LLMCompressError, match=rf"`kv_cache_gib` must be a whole number of GiB >= 1.*got {gib}"):
        ServerOptions(kv_cache_gib=gib)
    assert ServerOptions(device="cuda", kv_cache_gib=gib).device == "cuda"  # unused on CUDA


def test_server_command(tiny_model_dir):
    cmd = _command(VLLMServer(tiny_model_dir, ServerOptions(dtype="float32"), name="tiny", port=8123))
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _after(cmd, "--model") == str(tiny_model_dir) and _after(cmd, "--served-model-name") == "tiny"
    assert _after(cmd, "--host") == "127.0.0.1" and _after(cmd, "--port") == "8123"
    assert "--enable-lora" not in cmd and _after(cmd, "--dtype") == "float32"


def test_options_for_follows_the_run(tiny_model_dir, tmp_path):
    from llmcompress.backends.vllm import max_len, options_for
    from llmcompress.context import Runtime

    runtime = Runtime(device="cpu", threads=2, dtype="bfloat16", seed=7)
    o = options_for(runtime, tiny_model_dir)
    assert (o.device, o.threads, o.dtype, o.seed, o.max_model_len) == ("cpu", 2, "bfloat16", 7, 1024)
    assert options_for(runtime, tiny_model_dir, max_model_len=128, kv_cache_gib=2).max_model_len == 128
    assert max_len(_folder(tmp_path, "big", DENSE, max_position_embeddings=8192)) == 2048  # capped
    assert max_len(tmp_path / "missing") == 2048


# --- vLLM's interpreter --------------------------------------------------------------------------------------------


@pytest.fixture
def no_vllm_here(monkeypatch, tmp_path):
    """No LLMCOMPRESS_VLLM_PYTHON, vllm not importable here, and an empty managed-environment folder."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delenv("LLMCOMPRESS_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setenv("LLMCOMPRESS_VLLM_ENV", str(tmp_path / "vllm-env"))
    return tmp_path / "vllm-env"


def test_vllm_python_missing_names_setup(no_vllm_here):
    with pytest.raises(LLMCompressError) as err:
        vllm_runtime.vllm_python("stages[2] (benchmark)")
    msg = str(err.value)
    assert msg.startswith("stages[2] (benchmark) needs vLLM") and "`llmcompress setup vllm`" in msg
    assert str(no_vllm_here) in msg and "LLMCOMPRESS_VLLM_PYTHON" in msg


def test_vllm_python_managed_env_needs_its_stamp(no_vllm_here):
    python = no_vllm_here / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    with pytest.raises(LLMCompressError, match="llmcompress setup vllm"):  # half-built: setup never finished
        vllm_runtime.vllm_python()
    (no_vllm_here / vllm_runtime.STAMP).write_text("{}")
    assert vllm_runtime.vllm_python() == str(python)


def test_vllm_python_explicit(no_vllm_here, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCOMPRESS_VLLM_PYTHON", str(tmp_path / "nope"))
    with pytest.raises(LLMCompressError, match=r"LLMCOMPRESS_VLLM_PYTHON=.*nope does not exist"):
        vllm_runtime.vllm_python()
    monkeypatch.setenv("LLMCOMPRESS_VLLM_PYTHON", sys.executable)
    assert vllm_runtime.vllm_python() == sys.executable


def test_vllm_python_explicit_must_be_executable(no_vllm_here, monkeypatch, tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    python.chmod(0o644)
    monkeypatch.setenv("LLMCOMPRESS_VLLM_PYTHON", str(python))
    with pytest.raises(LLMCompressError, match=r"LLMCOMPRESS_VLLM_PYTHON=.*python is not executable\. Fix: "):
        vllm_runtime.vllm_python()


@pytest.fixture
def fake_pip(monkeypatch):
    """``setup``'s commands recorded, not run; ``venv`` leaves a python behind, ``import vllm`` succeeds."""
    calls = []

    def call(cmd, folder):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            python = vllm_runtime._env_python(Path(cmd[3]))
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")

    monkeypatch.setattr(vllm_runtime, "_call", call)
    return calls


def test_setup_refuses_to_replace_a_folder_it_did_not_build(tmp_path, fake_pip):
    own = tmp_path / "my-env"
    (own / "bin").mkdir(parents=True)
    (own / "bin" / "python").write_text("mine")
    for force in (False, True):
        with pytest.raises(LLMCompressError, match=r"`.*my-env` is not empty and was not built by") as err:
            vllm_runtime.setup(folder=own, force=force, log=lambda m: None)
        assert "Fix: set LLMCOMPRESS_VLLM_ENV to a new or empty folder" in str(err.value)
    assert (own / "bin" / "python").read_text() == "mine" and fake_pip == []  # untouched, nothing installed
    (tmp_path / "file").write_text("")
    with pytest.raises(LLMCompressError, match="is a file"):
        vllm_runtime.setup(folder=tmp_path / "file", log=lambda m: None)


@pytest.mark.parametrize("before", ["missing", "empty", "half-built", "built"])
def test_setup_builds_into_new_empty_or_its_own_folders(tmp_path, fake_pip, before):
    folder = tmp_path / "env"
    if before != "missing":
        folder.mkdir()
    if before == "half-built":  # a failed setup: the constraints file is written first
        (folder / vllm_runtime.CONSTRAINTS).write_text("old\n")
        (folder / "junk").write_text("")
    if before == "built":
        (folder / vllm_runtime.STAMP).write_text("{}")
    python = vllm_runtime.setup(folder=folder, force=True, log=lambda m: None)
    assert python == vllm_runtime._env_python(folder) and not (folder / "junk").exists()
    assert (folder / vllm_runtime.CONSTRAINTS).read_text().splitlines() == list(vllm_runtime.CPU_PINS)
    torch = [p for p in vllm_runtime.CPU_PINS if p.startswith("torch==")]
    assert fake_pip[1][-1:] == torch  # torch first, the pin written once in CPU_PINS
    assert vllm_runtime.installed_pins(folder)["pins"] == list(vllm_runtime.CPU_PINS)


def test_vllm_python_prefers_this_interpreter_when_it_has_vllm(no_vllm_here, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert vllm_runtime.vllm_python() == sys.executable


# --- config blocks -------------------------------------------------------------------------------------------------


def test_vllm_config_rejects_unknown_keys_and_maps_to_server_options():
    with pytest.raises(ValidationError, match="kv_cache"):
        VLLMConfig(kv_cache=1)
    with pytest.raises(ValidationError):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValidationError, match="kv_cache_gib"):
        VLLMConfig(kv_cache_gib=0.5)
    overrides = VLLMConfig(kv_cache_gib=2, enforce_eager=False).overrides()
    assert "max_model_len" not in overrides  # None: the model's own, decided when the server starts
    o = ServerOptions(**overrides)  # every key is a ServerOptions field
    assert o.kv_cache_gib == 2 and o.enforce_eager is False
    assert ServerOptions(**VLLMConfig(max_model_len=64).overrides()).max_model_len == 64


def _bench_recipe(tiny_model_dir, **stage):
    from llmcompress.recipe import load_recipe

    return load_recipe({"name": "t", "model": str(tiny_model_dir), "stages": [{"type": "benchmark", **stage}]})


def test_benchmark_accepts_backend_alias(tiny_model_dir):
    assert _bench_recipe(tiny_model_dir, backend="hf").stages[0].backends == ["hf"]
    assert _bench_recipe(tiny_model_dir, backend="vllm").stages[0].backends == ["vllm"]
    assert _bench_recipe(tiny_model_dir, backends=["hf", "vllm"]).stages[0].backends == ["hf", "vllm"]
    stage = _bench_recipe(tiny_model_dir, backends=["vllm"], vllm={"kv_cache_gib": 2}).stages[0]
    assert stage.vllm.kv_cache_gib == 2


def test_benchmark_rejects_backend_and_backends(tiny_model_dir):
    with pytest.raises(RecipeError, match=r"stages\[0\] \(benchmark\): give `backends: \[...\]` only"):
        _bench_recipe(tiny_model_dir, backend="hf", backends=["hf"])


def test_benchmark_rejects_unknown_vllm_keys(tiny_model_dir):
    with pytest.raises(RecipeError, match=r"stages\[0\] \(benchmark\): unknown key `kv_cache`"):
        _bench_recipe(tiny_model_dir, backends=["vllm"], vllm={"kv_cache": 1})


def test_benchmark_refuses_vllm_settings_without_the_vllm_backend(tiny_model_dir):
    with pytest.raises(RecipeError, match=r"stages\[0\] \(benchmark\): `vllm:` settings apply to backend vllm only, "
                       r"and `backends` is \['hf'\]\. Fix: add vllm to `backends`"):
        _bench_recipe(tiny_model_dir, vllm={"kv_cache_gib": 2})
    assert _bench_recipe(tiny_model_dir, vllm={}).stages[0].backends == ["hf"]  # an empty block sets nothing


def test_evaluate_refuses_vllm_settings_without_backend_vllm(tiny_model_dir):
    from llmcompress.recipe import load_recipe

    def recipe(**stage):
        return load_recipe({"name": "e", "model": str(tiny_model_dir),
                            "stages": [{"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 64}, **stage}]})

    with pytest.raises(RecipeError, match=r"stages\[0\] \(evaluate\): `vllm:` settings apply to `backend: vllm` "
                       r"only.*Fix: set `backend: vllm`"):
        recipe(vllm={"kv_cache_gib": 2})
    assert recipe(vllm={}).stages[0].backend == "hf"
    assert recipe(vllm=VLLMConfig().model_dump()).stages[0].backend == "hf"  # a resolved recipe writes the defaults


# --- the streaming client ------------------------------------------------------------------------------------------


class _FakeStream:
    """``client.stream(...)`` of httpx, answering with server-sent events built from ``chunks``."""

    def __init__(self, chunks: list[dict]):
        self.status_code = 200
        self.lines = [f"data: {json.dumps(c)}" for c in chunks] + ["data: [DONE]"]

    def stream(self, *args, **kwargs):
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def aiter_lines(self):
        for line in self.lines:
            yield line


def _timed(chunks: list[dict], max_tokens: int):
    import asyncio
    import time

    from llmcompress.serving.client import timed_completion

    return asyncio.run(timed_completion(_FakeStream(chunks), "http://x", "m", [1, 2], max_tokens, time.perf_counter()))


def _usage(n: int) -> dict:
    return {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": n}}


def test_client_spreads_the_tokens_of_a_multi_token_chunk():
    timing = _timed([{"choices": [{"text": "a"}]}, {"choices": [{"text": "bcd"}]}, _usage(4)], max_tokens=4)
    assert len(timing.token_s) == 4 and timing.token_s == sorted(timing.token_s) and timing.text == "abcd"


def test_client_keeps_one_arrival_per_token_when_a_closing_chunk_holds_none():
    timing = _timed([{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
                     {"choices": [{"text": "", "finish_reason": "length"}]}, _usage(2)], max_tokens=2)
    assert len(timing.token_s) == 2 and timing.text == "ab" and timing.completion_tokens == 2


def test_benchmark_servers_on_one_gpu_share_the_default_memory_share():
    from llmcompress.bench.stage import vllm_overrides

    assert vllm_overrides(VLLMConfig(), "cuda", 2)["gpu_memory_utilization"] == 0.425
    assert vllm_overrides(VLLMConfig(gpu_memory_utilization=0.6), "cuda", 3)["gpu_memory_utilization"] == 0.6
    cpu = vllm_overrides(VLLMConfig(), "cpu", 2)
    assert cpu["gpu_memory_utilization"] == 0.85 and cpu["prefix_caching"] is False
