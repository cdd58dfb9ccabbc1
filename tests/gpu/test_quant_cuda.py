"""GPU paths of the quantize stage (run on a CUDA machine; skipped with a reason elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8", "rtn"])
def test_quantize_on_cuda(make_ctx, method):
    if method.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    ctx = make_ctx(stages=[{"type": "quantize", "method": method, **({"group_size": 32} if method == "rtn" else {})}],
                   device="cuda")
    ctx.runtime = type(ctx.runtime)(device="cuda", threads=1, dtype="bfloat16", seed=0)
    ctx.original.runtime = ctx.runtime
    ctx.recipe.stages[0].run(ctx)
    model, tok = ctx.current.load()
    assert next(model.parameters()).device.type == "cuda"
    ids = tok("def f(x): return x", return_tensors="pt").to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
