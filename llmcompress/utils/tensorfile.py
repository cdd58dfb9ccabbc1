"""Tensors appended to a plain binary file and read back by position, in any dtype (bfloat16 included, which numpy
lacks): the logits stores of the evaluate and lora stages. Reads are file reads, not memory maps, so what was read is
the caller's memory only while it holds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch


def element_size(dtype: "torch.dtype") -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def write_tensor(f: BinaryIO, t: "torch.Tensor") -> int:
    """Append ``t``'s bytes (moved to the CPU, contiguous) to ``f``; returns how many were written."""
    import torch

    data = t.detach().cpu().contiguous().view(torch.uint8).numpy()
    f.write(memoryview(data))
    return data.nbytes


def read_tensor(f: BinaryIO, shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":
    """The next tensor of ``shape`` and ``dtype`` from ``f``'s current position (a writable CPU tensor)."""
    import math

    import torch

    raw = bytearray(f.read(math.prod(shape) * element_size(dtype)))
    return torch.frombuffer(raw, dtype=dtype).view(*shape)
