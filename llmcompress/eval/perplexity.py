"""Sliding-window perplexity on a text corpus (the method of the transformers perplexity guide).

Windows of ``ctx_len`` tokens start every ``stride`` tokens; each window scores only the tokens the previous window did
not, so every token after the first is scored once, with at least ``ctx_len - stride`` tokens of context (except at
the start). The same windows serve the KL comparison in ``kl.py``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.corpora import BUILTIN_PREFIX, builtin_text, check_builtin
from ..errors import RecipeError
from ..utils.io import read_jsonl

if TYPE_CHECKING:
    import torch

class PerplexityConfig(BaseModel):
    """Sliding-window perplexity settings (``perplexity:`` in an evaluate stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    corpus: str = Field(
        "builtin:pydoc",
        description="`builtin:pydoc` (Python's reference docs), or a .txt file, or a .jsonl file with a `text` field "
        "(relative to the recipe).",
    )
    ctx_len: int = Field(512, ge=2, description="Tokens per window.")
    stride: int = Field(256, ge=1, description="Tokens between window starts; each window scores only its new tokens.")
    max_tokens: int = Field(2048, ge=2, description="Score at most this many tokens from the start of the corpus.")

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, v: str) -> str:
        if v.startswith(BUILTIN_PREFIX):
            check_builtin(v, "corpus")
        elif not v.endswith((".txt", ".jsonl")):
            raise ValueError(f"corpus `{v}` must be `builtin:pydoc`, a .txt file or a .jsonl file with a `text` field")
        return v

    @model_validator(mode="after")
    def _stride_fits(self) -> "PerplexityConfig":
        if self.stride > self.ctx_len:
            raise ValueError(
                f"`stride` ({self.stride}) must be <= `ctx_len` ({self.ctx_len}), or tokens between windows go unscored"
            )
        return self


def load_corpus(corpus: str, base_dir: Path | None = None) -> str:
    """The text of a corpus: ``builtin:<name>``, or a .txt / .jsonl (``text`` field) path relative to ``base_dir``."""
    if corpus.startswith(BUILTIN_PREFIX):
        return builtin_text(corpus)
    path = Path(corpus).expanduser()
    path = path if path.is_absolute() or base_dir is None else base_dir / path
    if not path.is_file():
        raise RecipeError(f"perplexity.corpus: no such file `{path}`. Fix: check the path (relative to the recipe).")
    if path.suffix == ".txt":
        from ..data.calibration import read_txt

        text = read_txt(path)
    else:
        texts = []
        for i, row in read_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise RecipeError(f'{path}:{i}: no string `text` field. Fix: write lines like {{"text": "..."}}.')
            texts.append(row["text"])
        text = "\n\n".join(texts)
    if not text.strip():
        raise RecipeError(f"perplexity.corpus: `{path}` is empty. Fix: point to a file with text in it.")
    return text


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Windows:
    """Token ids of the corpus (cut to ``max_tokens``) and the windows over them.

    ``spans`` holds ``(begin, end, first)``: the window is ``ids[begin:end]``; it scores targets ``first..end-1``.
    """

    ids: "torch.Tensor"  # (T,) int64
    spans: list[tuple[int, int, int]]
    corpus: str

    @property
    def scored(self) -> int:
        return sum(end - first for _, end, first in self.spans)


def make_windows(tokenizer: Any, text: str, cfg: PerplexityConfig, corpus: str | None = None) -> Windows:
    """Tokenize ``text`` (no special tokens) up to ``cfg.max_tokens`` and lay the windows over it."""
    import torch

    # Tokenize a prefix only (the whole pydoc corpus is ~120k tokens); retry with all of it if the prefix fell short.
    cut = text[: cfg.max_tokens * 12]
    ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
    if len(ids) < cfg.max_tokens and len(cut) < len(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids[: cfg.max_tokens], dtype=torch.long)
    if len(ids) < 2:
        raise RecipeError(f"perplexity.corpus `{corpus}`: fewer than 2 tokens. Fix: use a longer text.")
    spans, scored_to = [], 1  # token 0 has no context, so it is never a target
    for begin in range(0, len(ids), cfg.stride):
        end = min(begin + cfg.ctx_len, len(ids))
        if end > scored_to:
            spans.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == len(ids):
            break
    return Windows(ids=ids, spans=spans, corpus=corpus or cfg.corpus)


def check_context(model: Any, cfg: PerplexityConfig) -> None:
    """Refuse windows longer than the model's position limit (a clear error instead of garbage or an index error)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.ctx_len > limit:
        raise RecipeError(
            f"perplexity.ctx_len: {cfg.ctx_len} exceeds the model's max_position_embeddings ({limit}). "
            f"Fix: set `ctx_len` <= {limit}."
        )


def window_logits(model: Any, windows: Windows) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """For each window: ``(logits (n, V) in the model's dtype, targets (n,))`` for its scored tokens, one window at a
    time."""
    import inspect

    import torch

    device = next(model.parameters()).device
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    for begin, end, first in windows.spans:
        n = end - first  # logits at positions first-1 .. end-2 predict targets first .. end-1
        ids = windows.ids[begin:end].unsqueeze(0).to(device)
        # Yield outside the `with`: a generator suspended inside inference_mode leaves it switched on for the caller
        # (two zipped generators restored it in the wrong order and turned autograd off for the rest of the run).
        with torch.inference_mode():
            kwargs = {"logits_to_keep": n + 1} if keep else {}  # only the last n+1 positions' logits are computed
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0, -(n + 1):-1]
        yield logits, windows.ids[first:end].to(device)


def window_logprobs(model: Any, windows: Windows) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """For each window: ``(logprobs (n, V) float32, targets (n,))`` for its scored tokens, one window at a time."""
    for logits, targets in window_logits(model, windows):
        yield logprobs_of(logits), targets


def logprobs_of(logits: "torch.Tensor") -> "torch.Tensor":
    """Next-token log-probabilities (float32) of ``logits`` in any dtype."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(logits.float(), dim=-1)


def nll_sum(logprobs: "torch.Tensor", targets: "torch.Tensor") -> float:
    """Summed negative log-likelihood (nats) of ``targets`` under ``logprobs``."""
    return -logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()


def summarize(total_nll: float, tokens: int, corpus: str) -> dict[str, Any]:
    return {"perplexity": math.exp(total_nll / tokens), "tokens": tokens, "corpus": corpus}


def perplexity(model: Any, windows: Windows, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """``{"perplexity", "tokens", "corpus"}`` of ``model`` over ``windows``."""
    total = 0.0
    for logprobs, targets in window_logprobs(model, windows):
        total += nll_sum(logprobs, targets)
        if progress is not None:
            progress(1)
    return summarize(total, windows.scored, windows.corpus)
