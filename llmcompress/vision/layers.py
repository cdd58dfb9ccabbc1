"""Quantized layers that vision models need beyond the LLM methods'.

- ``RTNConv2d``: round-to-nearest Conv2d (depthwise and grouped too): the filter is flattened to
  ``(out, in/groups * kh * kw)`` and held by an ``RTNLinear`` (same packing, scales and zero points as rtn's Linear
  layers), dequantized on each forward. Its folders load through ``models.skeleton.load_swapped``.
"""

from __future__ import annotations

from typing import Any

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
