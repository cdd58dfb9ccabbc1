"""Weights in memory (``models.loading.param_bytes``): what the benchmark, the quantize stage and the app report.

Quantized layers hold their weights in places ``parameters()`` does not list: torchao tensor subclasses (no storage
of their own), HQQLinear's scale/zero (plain attributes), dynamic int8's packed weights (neither parameter nor buffer).
"""

from __future__ import annotations

import pytest


def test_param_bytes_counts_torchao_tensor_subclasses_at_their_packed_size(tiny_model_dir):
    """torchao's weights have no storage of their own (data_ptr 0): counted through their inner tensors."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from llmcompress.models.loading import load_model, param_bytes

    model, _ = load_model(tiny_model_dir, "cpu", "float32")
    dense = param_bytes(model)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    weights = sum(m.weight.numel() for m in linears)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and "lm_head" not in fqn)
    packed = dense - weights * 4 + weights  # int8 instead of fp32
    scales = sum(m.weight.shape[0] for m in linears) * 4
    assert packed <= param_bytes(model) <= packed + 2 * scales


@pytest.mark.parametrize("per_channel", [True, False])
def test_param_bytes_counts_dynamic_int8_packed_weights(per_channel):
    import torch

    from llmcompress.models.loading import param_bytes
    from llmcompress.quant.dynamic import quantize_dynamic_

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    quantize_dynamic_(model, ["0", "2"], per_channel, "float32")
    int8 = 64 * 32 + 32 * 8
    bias = 32 * 4  # fp32
    qparams = (32 + 8) * (8 + 8) if per_channel else 0  # a float64 scale and an int64 zero point per output row
    assert param_bytes(model) == int8 + bias + qparams


def test_param_bytes_counts_hqq_scales_and_zeros(tiny_model_dir):
    import torch

    from llmcompress.models.loading import load_model, param_bytes
    from llmcompress.quant.hqq import HQQConfig, quantize_hqq_

    model, _ = load_model(tiny_model_dir, "cpu", "float32")
    quantize_hqq_(model, HQQConfig(method="hqq", bits=4, group_size=32), "cpu", torch.float32)
    layers = [m for m in model.modules() if type(m).__name__ == "HQQLinear"]
    assert layers
    plain = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    meta = sum(v.numel() * v.element_size() for m in layers for v in m.meta.values() if isinstance(v, torch.Tensor))
    assert meta > 0 and param_bytes(model) == plain + meta  # (the tiny llama has no biases)
