"""Benchmark prompts: real English text (Python's reference docs), cut into windows of exactly N tokens."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

SOURCE = "pydoc_data.topics"


@lru_cache(maxsize=1)
def _corpus() -> str:
    from ..models.tiny import corpus_text

    return corpus_text()


def prompt_ids(tokenizer: Any, batch: int, tokens: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``tokens`` token ids each (no padding needed, no special tokens).

    Row ``i`` is the ``i``-th consecutive window of the tokenized corpus, so two models with the same tokenizer get
    the same ids. The corpus (~1 MB) is tokenized only as far as needed and wraps around if it runs out.
    """
    if batch < 1 or tokens < 1:
        raise ValueError(f"prompt_ids: batch and tokens must be >= 1, got batch={batch}, tokens={tokens}")
    text = _corpus()
    need = batch * tokens
    chars = min(len(text), need * 8 + 256)  # real tokenizers average 3-5 characters per token
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    ids = ids[:-1] if len(ids) > need else ids  # the last token may be a cut word: drop it when there is room
    if not ids:
        raise ValueError(f"prompt_ids: the tokenizer produced no tokens from {SOURCE}")
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * tokens : (i + 1) * tokens] for i in range(batch)]
