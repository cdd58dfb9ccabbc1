"""Quantized and resized layers that vision models need beyond the LLM methods', and one loader for their folders.

- ``RTNConv2d``: round-to-nearest Conv2d (depthwise and grouped too): the filter is flattened to
  ``(out, in/groups * kh * kw)`` and held by an ``RTNLinear`` (same packing, scales and zero points as rtn's Linear
  layers), dequantized on each forward.
- ``load_swapped``: the architecture from config.json (any kind: vision, VLM, LLM), a ``swap`` callback that puts
  the special layers in place (and takes their tensors out of the state dict), then the rest of the weights. Used by
  the rtn layout of vision models (Linear + Conv2d), dynamic int8 and structured (resized) folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

_CLASSES: dict[str, Any] = {}


def _make_rtn_conv():
    import torch
    import torch.nn.functional as F

    from ..quant.rtn import __getattr__ as rtn_attr

    rtn_linear = rtn_attr("RTNLinear")

    class RTNConv2d(torch.nn.Module):
        """A Conv2d whose filter is stored as rtn ints: ``q`` is an RTNLinear over the flattened filter."""

        def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple, stride: tuple, padding: Any,
                     dilation: tuple, groups: int, q: Any):
            super().__init__()
            self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
            self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
            self.q = q

        @classmethod
        def from_conv(cls, conv: torch.nn.Conv2d, bits: int, group_size: int, symmetric: bool) -> "RTNConv2d":
            out_c = conv.out_channels
            flat = torch.nn.Linear(conv.weight[0].numel(), out_c, bias=conv.bias is not None,
                                   dtype=conv.weight.dtype, device=conv.weight.device)
            with torch.no_grad():
                flat.weight.copy_(conv.weight.reshape(out_c, -1))
                if conv.bias is not None:
                    flat.bias.copy_(conv.bias)
            q = rtn_linear.from_linear(flat, bits, group_size, symmetric)
            return cls(conv.in_channels, out_c, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                       conv.groups, q)

        @classmethod
        def empty(cls, conv: torch.nn.Conv2d, bits: int, group_size: int, symmetric: bool, dtype) -> "RTNConv2d":
            k = conv.weight[0].numel()
            q = rtn_linear(k, conv.out_channels, bits, group_size, symmetric, conv.bias is not None, dtype=dtype)
            return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, q)

        def dequantize(self) -> torch.Tensor:
            """The dense (out, in/groups, kh, kw) filter this layer computes with."""
            return self.q.dequantize().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bias = None if self.q.bias is None else self.q.bias.to(x.dtype)
            return F.conv2d(x, self.dequantize().to(x.dtype), bias, self.stride, self.padding, self.dilation,
                            self.groups)

        def extra_repr(self) -> str:
            return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, groups={self.groups}, "
                    f"bits={self.q.bits}, group_size={self.q.group_size}")

    return RTNConv2d


def rtn_conv_class():
    """``RTNConv2d`` (built on first use, so importing this module stays torch-free)."""
    if "rtn_conv" not in _CLASSES:
        _CLASSES["rtn_conv"] = _make_rtn_conv()
    return _CLASSES["rtn_conv"]


def conv_group_size(conv: Any, group_size: int) -> int:
    """Weights per scale for a conv filter: ``group_size`` when it divides the flattened filter, else the filter."""
    k = conv.weight[0].numel()
    return group_size if group_size != -1 and k % group_size == 0 else k


def set_module(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def read_state(path: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def load_swapped(path: str | Path, device: str, dtype: str, swap: Callable[[Any, dict, Any], dict | None]):
    """The architecture of ``path``, ``swap(model, state, torch_dtype)`` in place, then every remaining weight.

    ``swap`` replaces modules and pops the state-dict entries it consumed; it may return ``{name: module}`` to put
    in place after the weights load (modules whose own loading cannot read a safetensors state). Raises when a weight
    is missing.
    """
    import torch
    from transformers import AutoConfig

    from ..models.loading import read_meta, to_model_keys, torch_dtype
    from ..utils.tensorfile import no_init
    from .kind import auto_model_class

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    dt = torch_dtype(dtype)
    with no_init():
        model = auto_model_class(config).from_config(config, dtype=dt)
    state = to_model_keys(model, read_state(path))
    resize_structured_(model, read_meta(path), state, dt)
    later = swap(model, state, dt) or {}
    state = {k: v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")} if getattr(
        config, "tie_word_embeddings", False) else set()
    if tied:
        model.tie_weights()
    missing = [k for k in result.missing_keys if k not in tied and k.rpartition(".")[0] not in later]
    if missing:
        raise RuntimeError(f"{path}: weights missing from the checkpoint: {missing[:5]}")
    for name, module in later.items():
        set_module(model, name, module)
    return model.to(device).eval()


def resize_structured_(model: Any, meta: dict, state: dict, dtype: Any) -> None:
    """Give a skeleton the shapes structured pruning left: the Linear layers llmcompress.json lists (whatever layout
    later replaces them with), then every other parameter whose saved shape differs (ConvNeXt V2's GRN)."""
    import torch

    for name, (out_f, in_f) in ((meta.get("structured") or {}).get("modules") or {}).items():
        old = model.get_submodule(name)
        set_module(model, name, torch.nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=dtype))
    resize_to_state_(model, state)


def resize_to_state_(model: Any, state: dict) -> list[str]:
    """Give every parameter whose saved shape differs the saved shape (structured pruning shrank it); Linear layers
    get matching ``in_features``/``out_features``. Returns the names resized."""
    import torch

    resized = []
    for name, param in list(model.named_parameters()):
        saved = state.get(name)
        if saved is None or saved.shape == param.shape:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(torch.empty(saved.shape, dtype=param.dtype), requires_grad=False))
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            module.out_features, module.in_features = saved.shape
        resized.append(name)
    return resized


def load_structured(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """FORMATS["structured"]: the architecture, every layer at its saved (structured-pruned) shape, the weights."""
    return load_swapped(path, device, dtype, lambda model, state, dt: None)
