"""The teacher as a cache on disk: per training token, its top-k log-probs (float16 by default) and their token ids
(int32), plus the log of the mass left over (float32), and optionally its last hidden state. Written once, before the
student loads (the teacher loads, writes, is released), read back batch by batch; ``top_k=None`` stores full logits.

Files in the cache folder (one row per sequence, rows back to back; reads are file reads, not memory maps)::

    values.bin (N, L, k) float16   indices.bin (N, L, k) int32   rest.bin (N, L) float32
    logits.bin (N, L, V) the teacher's dtype (top_k: null)       hidden.bin (N, L, H) the teacher's dtype
    cache.json  {"key", "shape", "top_k", "temperature", "files", ...}: written last, so a cache without it is partial

Size per token: k x 6 + 4 bytes (k = 64: 388 bytes; full logits of a 49,152-token vocabulary in bf16: 96 KiB).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..utils.io import atomic_write_json, read_json
from ..utils.tensorfile import element_size, read_tensor, write_tensor

if TYPE_CHECKING:
    import torch

INFO = "cache.json"


def _dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name.removeprefix("torch."))


def topk_targets(logits: "torch.Tensor", k: int | None, temperature: float,
                 dtype: str = "float16") -> dict[str, "torch.Tensor"]:
    """``{"values", "indices", "rest"}`` of ``logits (B, T, V)`` at ``temperature``, values stored in ``dtype``
    (k=None: ``{"logits"}``)."""
    import torch

    if k is None:
        return {"logits": logits}
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, log_p.shape[-1])
    values, indices = log_p.topk(k, dim=-1)  # (B, T, k)
    rest = torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), dim=-1)  # (B, T): log of the other tokens' mass
    return {"values": values.to(getattr(torch, dtype)), "indices": indices.to(torch.int32), "rest": rest}


class TopKLogits:
    """A written cache; ``targets(index)`` gives the rows ``index`` as the loss takes them (distill/loss.py)."""

    def __init__(self, root: Path, info: dict):
        self.root, self.info = Path(root), info
        self.shapes = {name: tuple(f["shape"]) for name, f in info["files"].items()}
        self.dtypes = {name: _dtype(f["dtype"]) for name, f in info["files"].items()}

    @property
    def top_k(self) -> int | None:
        return self.info["top_k"]

    @property
    def nbytes(self) -> int:
        return sum((self.root / f"{n}.bin").stat().st_size for n in self.shapes)

    @classmethod
    def open(cls, root: Path, key: str) -> "TopKLogits | None":
        """The cache at ``root`` when it is whole and was written for ``key``; else None."""
        try:
            info = read_json(Path(root) / INFO)
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("key") != key:
            return None
        cache = cls(root, info)
        for name, shape in cache.shapes.items():
            f = cache.root / f"{name}.bin"
            expected = element_size(cache.dtypes[name])
            for d in shape:
                expected *= d
            if not f.is_file() or f.stat().st_size != expected:
                return None
        return cache

    @classmethod
    def write(cls, root: Path, teacher: Any, input_ids: "torch.Tensor", attention_mask: "torch.Tensor", *,
              top_k: int | None, temperature: float, hidden: bool, batch_size: int, key: str,
              dtype: str = "float16", progress: Callable[..., None] | None = None) -> "TopKLogits":
        """Run ``teacher`` over every sequence (``(N, L)`` ids and mask, ``batch_size`` at a time) and store it."""
        import torch

        root = Path(root)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        n, length = input_ids.shape
        device = next(teacher.parameters()).device
        handles: dict[str, Any] = {}
        files: dict[str, dict] = {}
        try:
            for i in range(0, n, batch_size):
                ids = input_ids[i: i + batch_size].to(device)
                mask = attention_mask[i: i + batch_size].to(device)
                with torch.inference_mode():
                    out = teacher(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=hidden)
                    parts = topk_targets(out.logits, top_k, temperature, dtype)
                    if hidden:
                        parts["hidden"] = out.hidden_states[-1]
                for name, t in parts.items():
                    if name not in handles:
                        handles[name] = open(root / f"{name}.bin", "wb")
                        files[name] = {"shape": [n, length, *t.shape[2:]], "dtype": str(t.dtype).removeprefix("torch.")}
                    write_tensor(handles[name], t)
                if progress is not None:
                    progress(len(ids))
        finally:
            for f in handles.values():
                f.close()
        info = {"key": key, "top_k": top_k, "temperature": temperature, "hidden": hidden, "files": files}
        atomic_write_json(root / INFO, info)  # last: the cache is whole
        return cls(root, info)

    def targets(self, index: "torch.Tensor", device: Any = "cpu") -> dict[str, "torch.Tensor"]:
        """The rows ``index``: ``values``/``indices``/``rest`` (or ``logits``), and ``hidden`` when cached."""
        import torch

        out = {}
        rows = index.tolist()
        for name, shape in self.shapes.items():
            row_shape, dtype = shape[1:], self.dtypes[name]
            row_bytes = element_size(dtype)
            for d in row_shape:
                row_bytes *= d
            parts = []
            with open(self.root / f"{name}.bin", "rb") as f:
                for i in rows:
                    f.seek(i * row_bytes)
                    parts.append(read_tensor(f, row_shape, dtype))
            with torch.autocast("cpu", enabled=False):  # called inside the forward's bf16 autocast: stack as stored
                out[name] = torch.stack(parts).to(device)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
