"""Tensors in files, one at a time, in any dtype (bfloat16 included, which numpy lacks): plain binary files read back
by position (the logits stores of the evaluate and lora stages), and safetensors files rewritten tensor by tensor
(gptq's dense parts cast to the source's dtype, lora's merged weights). Reads are file reads, not memory maps, so
what was read is the caller's memory only while it holds it: rewriting a 3 GiB file holds one tensor, where
``safetensors.safe_open`` would leave the whole file mapped and resident."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

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


# ---------------------------------------------------------------------------------------------------------------------
# safetensors

#: safetensors' dtype names -> torch dtype attribute names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
              "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def no_init():
    """Context: build a model without initializing its weights (they come from a checkpoint next)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def safetensors_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name (``BF16`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, _ST_DTYPES[code])


def safetensors_header(path: Path) -> tuple[int, dict]:
    """``(header length, header)`` of a safetensors file, read without its tensors. Raises OSError, ValueError or
    struct.error for a file that is not one."""
    size = Path(path).stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))
        if n > min(size - 8, 512 * 2**20):
            raise ValueError("its header length is larger than the file")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return n, header


def rewrite_safetensors(src: Path, dst: Path, dtype_for: Callable[[str, "torch.dtype"], "torch.dtype"],
                        value_for: Callable[[str, "torch.Tensor"], "torch.Tensor"] | None = None) -> None:
    """Write ``src``'s tensors to ``dst`` (which may be ``src``) one at a time, in the file's order: each tensor
    through ``value_for(name, tensor)`` (same shape; default: as stored), cast to ``dtype_for(name, stored dtype)``.
    The metadata is kept. Written to a hidden file beside ``dst`` and renamed over it when complete."""

    n, header = safetensors_header(src)
    metadata = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    names = {v: k for k, v in _ST_DTYPES.items()}
    out_header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, info in entries:
        dtype = dtype_for(name, safetensors_dtype(info["dtype"]))
        nbytes = element_size(dtype) * _numel(info["shape"])
        out_header[name] = {"dtype": names[str(dtype).removeprefix("torch.")], "shape": info["shape"],
                            "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(out_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(struct.pack("<Q", len(raw)) + raw)
            for name, info in entries:
                fin.seek(8 + n + info["data_offsets"][0])
                t = read_tensor(fin, tuple(info["shape"]), safetensors_dtype(info["dtype"]))
                if value_for is not None:
                    t = value_for(name, t)
                    if tuple(t.shape) != tuple(info["shape"]):
                        raise ValueError(f"{src}: `{name}` is {tuple(info['shape'])}, its new value "
                                         f"{tuple(t.shape)}")
                t = t.to(safetensors_dtype(out_header[name]["dtype"]))
                write_tensor(fout, t)
                del t
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _numel(shape: list[int]) -> int:
    import math

    return math.prod(shape)
