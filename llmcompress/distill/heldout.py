"""Held-out measurements during distillation: the student's perplexity on text it never trains on, and its KL to the
teacher there (the teacher's top-k on those windows is cached with the training targets, at temperature 1, so the
KL is the same (k+1)-bucket KL the loss uses; full KL with ``top_k: null``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError

if TYPE_CHECKING:
    import torch

    from .config import HeldOutConfig


def held_out_windows(cfg: "HeldOutConfig", tokenizer: Any, seq_len: int, base_dir: Path | None) -> "torch.Tensor":
    """``(W, seq_len)``: the first ``cfg.tokens`` tokens of the held-out text, in back-to-back windows."""
    import torch

    from ..eval.perplexity import load_corpus

    text = load_corpus(cfg.source, base_dir)
    ids = tokenizer(text[: cfg.tokens * 12], add_special_tokens=False)["input_ids"][: cfg.tokens]
    windows = len(ids) // seq_len
    if windows < 1:
        raise RecipeError(f"held_out.source `{cfg.source}` has {len(ids)} tokens, fewer than one window of "
                          f"data.seq_len {seq_len}. Fix: add text, raise `held_out.tokens` or lower `data.seq_len`")
    return torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


@dataclass
class HeldOut:
    """The held-out windows, the teacher's cache on them, and how often to measure."""

    windows: "torch.Tensor"  # (W, L)
    cache: Any  # distill.topk.TopKLogits written at temperature 1
    every: int
    batch_size: int = 4

    def measure(self, model: Any, pos: Any, autocast: Any) -> dict[str, Any]:
        """``{"step", "tokens", "seconds", "perplexity", "kl"}`` of ``model`` now (train mode restored after)."""
        import torch

        from .loss import full_kl, topk_kl

        was_training = model.training
        model.eval()
        nll, kl, n_nll, n_kl = 0.0, 0.0, 0, 0
        t = time.perf_counter()
        with torch.no_grad(), autocast:
            for i in range(0, len(self.windows), self.batch_size):
                index = torch.arange(i, min(i + self.batch_size, len(self.windows)))
                ids = self.windows[index]
                logits = model(input_ids=ids, use_cache=False).logits.float()  # (B, L, V)
                log_q = torch.log_softmax(logits, dim=-1)
                nll -= log_q[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item()
                n_nll += ids[:, 1:].numel()
                target = self.cache.targets(index)
                if "logits" in target:
                    per = full_kl(torch.log_softmax(target["logits"].float(), dim=-1), log_q)
                else:
                    per = topk_kl(target["values"], target["indices"], target["rest"], logits)
                kl += per.sum().item()
                n_kl += per.numel()
        if was_training:
            model.train()
        return {"step": pos.step, "tokens": pos.tokens, "seconds": round(pos.seconds, 3),
                "perplexity": round(math.exp(nll / max(n_nll, 1)), 4), "kl": round(kl / max(n_kl, 1), 6),
                "measure_seconds": round(time.perf_counter() - t, 3)}
