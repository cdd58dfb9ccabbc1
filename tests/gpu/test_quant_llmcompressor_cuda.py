"""llmcompressor FP8 (W8A8-FP8 dynamic) on a CUDA GPU with compute capability >= 8.9; skipped, with the reason,
elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_llmc_fp8_on_the_tiny_model(make_ctx):
    pytest.importorskip("llmcompressor")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}")
    ctx = make_ctx(stages=[{"type": "quantize", "method": "llmc-fp8"}], device="cuda")
    ctx.runtime = type(ctx.runtime)(device="cuda", threads=1, dtype="bfloat16", seed=0)
    ctx.original.runtime = ctx.runtime
    ctx.recipe.stages[0].preflight()  # passes on this GPU
    result = ctx.recipe.stages[0].run(ctx)
    assert (result.data["format"], result.data["quantized_modules"]) == ("compressed-tensors", 14)
    assert result.data["reload_check"]["max_abs_logit_diff"] < 0.05
    qc = json.loads((ctx.current.path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "float-quantized")
    assert qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    assert ctx.current.size_bytes < 0.8 * ctx.original.size_bytes
    model, tok = ctx.current.load()
    ids = tok("def f(x): return x", return_tensors="pt").to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
