"""The original model's next-token logits on the perplexity windows, written once to disk and read back window by
window, so that KL(original || compressed) never needs both models in memory.

The logits are stored as the model computed them (bfloat16 stays bfloat16, float32 stays float32), so the KL read
back is the one a side-by-side pass gives, bit for bit. Size: scored tokens x vocabulary x 2 or 4 bytes (2,048 tokens
of a 49,152-token vocabulary in bfloat16: 192 MiB). The store sits beside the original's cached results, so a sweep
runs the original once; a store whose windows, vocabulary or files do not match what is asked is never read.

Layout: ``<store>/logits.bin`` (the windows' rows, one after the other) and ``<store>/index.json`` (dtype, vocabulary,
windows, a hash of the token ids), written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..utils.io import atomic_dir
from ..utils.tensorfile import read_tensor, write_tensor

if TYPE_CHECKING:
    import torch

    from .perplexity import Windows

INDEX, DATA = "index.json", "logits.bin"
FORMAT = 1


def _ids_hash(windows: "Windows") -> str:
    return hashlib.sha256(windows.ids.numpy().tobytes()).hexdigest()[:16]


def _expected(windows: "Windows") -> dict[str, Any]:
    return {"format": FORMAT, "spans": [list(s) for s in windows.spans], "ids": _ids_hash(windows)}


def read_index(path: Path, windows: "Windows") -> dict | None:
    """The store's index when it holds ``windows`` completely; else None (missing, partial, or other windows)."""
    try:
        index = json.loads((Path(path) / INDEX).read_text())
        size = (Path(path) / DATA).stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or any(index.get(k) != v for k, v in _expected(windows).items()):
        return None
    if size != index.get("bytes"):
        return None
    return index


def write(path: Path, model: Any, windows: "Windows", progress: Callable[..., None] | None = None) -> dict:
    """Run ``model`` over ``windows`` and store its logits at ``path`` (replacing what was there); returns the
    original's perplexity over the windows, which the same pass gives."""
    from .perplexity import logprobs_of, nll_sum, summarize, window_logits

    total_nll, written, dtype, vocab = 0.0, 0, None, None
    with atomic_dir(Path(path)) as tmp, open(tmp / DATA, "wb") as f:
        for logits, targets in window_logits(model, windows):
            dtype, vocab = str(logits.dtype).removeprefix("torch."), logits.shape[-1]
            written += write_tensor(f, logits)
            total_nll += nll_sum(logprobs_of(logits), targets)
            if progress is not None:
                progress(1)
        f.flush()
        index = {**_expected(windows), "dtype": dtype, "vocab": vocab, "bytes": written}
        (tmp / INDEX).write_text(json.dumps(index))
    return summarize(total_nll, windows.scored, windows.corpus)


def logprobs(path: Path, windows: "Windows", device: str = "cpu") -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """For each window, ``(logprobs (n, V) float32, targets (n,))`` of the stored model, as ``window_logprobs``
    yields them. Raises ValueError when the store does not hold ``windows``."""
    import torch

    from .perplexity import logprobs_of

    index = read_index(path, windows)
    if index is None:
        raise ValueError(f"{path}: no complete logits store for these windows")
    dtype, vocab = getattr(torch, index["dtype"]), index["vocab"]
    with open(Path(path) / DATA, "rb") as f:
        for _, end, first in windows.spans:
            logits = read_tensor(f, (end - first, vocab), dtype)
            yield logprobs_of(logits).to(device), windows.ids[first:end].to(device)
