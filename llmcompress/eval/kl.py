"""KL(P_original || P_compressed) of the next-token distributions, per token, on the perplexity windows.

Both models run window by window, so at most one window's logits per model are held at a time; the original may
instead be a store of its logits on disk (``reference.py``), so that only the compressed model is in memory. Per-token
KL in nats; ``top1_agreement`` is the share of positions where both models' most likely next token is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import LLMCompressError
from .perplexity import Windows, nll_sum, summarize, window_logprobs


@dataclass
class Comparison:
    """KL figures, plus the compressed model's perplexity, which the same pass gets for free."""

    kl: dict[str, Any]
    perplexity: dict[str, Any]


Progress = Callable[..., None]


def compare(original: Any, compressed: Any, windows: Windows, progress: Progress | None = None) -> Comparison:
    """Run both models over ``windows``: KL(P_original || P_compressed) stats and the compressed model's perplexity.

    ``original``: a model, or the folder of a logits store of it written by ``reference.write``."""
    import torch

    if isinstance(original, (str, Path)):
        from .reference import logprobs

        reference = logprobs(Path(original), windows)
    else:
        reference = window_logprobs(original, windows)
    kls, agree, total_nll = [], 0, 0.0
    for (lp, targets), (lq, _) in zip(reference, window_logprobs(compressed, windows)):
        if lp.shape[-1] != lq.shape[-1]:
            raise LLMCompressError(
                f"KL: the models' vocabularies differ ({lp.shape[-1]} vs {lq.shape[-1]} logits), so their next-token "
                "distributions cannot be compared. Fix: compress without resizing the vocabulary, or set `kl: false`."
            )
        lq = lq.to(lp.device)
        kls.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0).cpu())  # (n,); clamp: float error can go below 0
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        total_nll += nll_sum(lq, targets.to(lq.device))
        del lp, lq
        if progress is not None:
            progress(1)
    per_token = torch.cat(kls).double()
    kl = {
        "kl_mean": per_token.mean().item(),
        "kl_p95": torch.quantile(per_token, 0.95).item(),
        "kl_max": per_token.max().item(),
        "top1_agreement": agree / len(per_token),
        "tokens": len(per_token),
    }
    return Comparison(kl=kl, perplexity=summarize(total_nll, windows.scored, windows.corpus))


def kl_divergence(original: Any, compressed: Any, windows: Windows, progress: Progress | None = None) -> dict:
    """``{"kl_mean", "kl_p95", "kl_max", "top1_agreement", "tokens"}``: KL(P_original || P_compressed) in nats/token."""
    return compare(original, compressed, windows, progress).kl
