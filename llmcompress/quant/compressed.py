"""Integer-grid layers (rtn, gptq) written as a compressed-tensors ``pack-quantized`` folder: the format transformers
(with ``compressed-tensors`` installed) and vLLM load as they are.

rtn and gptq hold evenly spaced integers with a per-group scale (and an integer zero point): exactly compressed-tensors'
``int`` weights. The dense model is rebuilt with each quantized layer's dequantized weight, compressed-tensors'
quantization scheme is attached with *our* scales and zero points (nothing is re-rounded: every weight divided by its
scale must already be an integer, checked), and ``ModelCompressor`` packs it. Zero points move to compressed-tensors'
signed convention (``q - 2**(bits-1)``). Used by the rtn quantize stage (its folder) and by ``export: {format:
compressed-tensors}`` (rtn and gptq folders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LLMCompressError


def write_compressed_tensors(model: Any, tokenizer: Any, out: Path, storage: str, gptq_sym: bool = False
                             ) -> dict[str, Any]:
    """Write ``model`` (rtn or gptq layers) into ``out`` as a ``pack-quantized`` folder, dense parts in the dtype
    ``storage``; returns ``{"scheme": ...}``. ``gptq_sym``: gptqmodel layers do not record their symmetry."""
    import copy

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config,
    )

    from transformers import AutoModelForCausalLM

    from ..utils.tensorfile import no_init

    layers = {name: _int_layer(name, m, gptq_sym) for name, m in quantized_linears(model).items()}
    if not layers:
        raise LLMCompressError("no rtn or gptq layer found in the model")
    kinds = {(q["bits"], q["group_size"], q["symmetric"]) for q in layers.values()}
    if len(kinds) > 1:
        raise LLMCompressError(f"layers quantized with different settings {sorted(kinds)}: one scheme expected")
    bits, group_size, symmetric = kinds.pop()
    channel = all(q["groups"] == 1 for q in layers.values())
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="channel" if channel else "group", group_size=None if channel else group_size)
    dense_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers]
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=dense_names, quantization_status=QuantizationStatus.FROZEN)

    plain = copy.deepcopy(model.config)  # the dense model's config
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    with no_init():
        dense = AutoModelForCausalLM.from_config(plain, dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(f"{n}." for n in layers))}
    for name, q in layers.items():  # exactly k * scale, so compressing recovers k without re-rounding
        state[f"{name}.weight"] = (q["k"].float() * q["scale"].float()[..., None]).reshape(q["shape"])
        if q["bias"] is not None:
            state[f"{name}.bias"] = q["bias"]
    dense.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if getattr(dense.config, "tie_word_embeddings", False):
        dense.tie_weights()
    apply_quantization_config(dense, config, show_progress=False)
    for name, q in layers.items():
        module = dense.get_submodule(name)
        module.weight_scale.data = q["scale"].clone()
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = q["zero_point"].to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format="pack-quantized")
    compressor.compress_model(dense)
    for pname, p in dense.named_parameters():  # dense parts as the original stores them; scales keep their dtype
        if p.dtype == torch.float32 and not pname.endswith("weight_scale"):
            p.data = p.data.to(getattr(torch, storage))
    dense.config.dtype = getattr(torch, storage)
    dense.save_pretrained(out)
    compressor.update_config(str(out))
    tokenizer.save_pretrained(out)
    strategy = str(getattr(args.strategy, "value", args.strategy))
    return {"scheme": {"format": "pack-quantized", "num_bits": bits, "strategy": strategy,
                       "group_size": None if channel else group_size, "symmetric": symmetric,
                       "quantized_layers": len(layers), "ignore": dense_names}}


def _int_layer(name: str, module, gptq_sym: bool) -> dict[str, Any]:
    """Integer codes ``k`` (signed, compressed-tensors' convention), scales and zero points of an rtn/gptq layer."""
    import torch

    kind = type(module).__name__
    if kind == "RTNLinear":
        bits, scale, sym = module.bits, module.scales.detach(), module.symmetric
    elif hasattr(module, "dequantize_weight") and hasattr(module, "scales"):  # gptqmodel
        bits, scale = module.bits, module.scales.detach().T.contiguous()
        sym = gptq_sym  # gptqmodel layers do not keep it; llmcompress.json does
        gs = module.in_features // scale.shape[1]
        if not torch.equal(module.g_idx.cpu().long(), torch.arange(module.in_features) // gs):
            raise LLMCompressError(f"`{name}`: act-order (g_idx) is not supported by this converter")
    else:
        raise LLMCompressError(f"`{name}` ({kind}) is not an rtn or gptq layer; cannot convert to compressed-tensors")
    out_f, in_f = module.out_features, module.in_features
    groups = scale.shape[1]
    if kind == "RTNLinear":  # its integers as stored (a bf16 weight holds k * scale exactly only for small k)
        k = module.codes().float()
    else:
        values = int_layer_weight(module).reshape(out_f, groups, in_f // groups) / scale.float()[..., None]
        k = values.round()
        off_grid = float((values - k).abs().max())
        if off_grid > 0.05:
            raise LLMCompressError(f"`{name}`: weights are not integer multiples of their scales "
                                   f"(off by {off_grid:.3f})")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        zero = torch.zeros_like(scale, dtype=torch.int8)
    else:  # any zero point that keeps every code in range gives the same weights; map each group's minimum to lo
        zero = (lo - k.amin(-1)).clamp(lo, hi)
    codes = k + zero[..., None]
    if codes.min() < lo or codes.max() > hi:
        raise LLMCompressError(f"`{name}`: codes do not fit {bits}-bit compressed-tensors ints")
    return {"bits": bits, "group_size": in_f // groups, "groups": groups, "symmetric": sym, "shape": (out_f, in_f),
            "k": k, "scale": scale, "zero_point": zero.to(torch.int8),
            "bias": None if getattr(module, "bias", None) is None else module.bias.detach()}


def int_layer_weight(module: Any) -> Any:
    """The float32 ``(out, in)`` weight an rtn or gptqmodel layer computes with."""
    if type(module).__name__ == "RTNLinear":
        return module.dequantize().float()
    return module.dequantize_weight().float().T.contiguous()  # gptqmodel quant linears hold (in, out)


def quantized_linears(model: Any) -> dict[str, Any]:
    """Modules that act as a linear layer but do not hold a plain dense weight (rtn, gptq, hqq, bnb, torchao)."""
    import torch

    out = {}
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if type(m) is torch.nn.Linear and weight is not None and type(weight.data) is torch.Tensor:
            continue
        if isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")):
            out[name] = m
    return out
