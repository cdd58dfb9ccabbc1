"""The user cache folder (dense copies of builtin models, baseline results). Override with LLMCOMPRESS_CACHE."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``<cache root>/<parts...>``; the parent folder is created, the path itself is left to the caller."""
    root = os.environ.get("LLMCOMPRESS_CACHE")
    if not root:
        from platformdirs import user_cache_dir

        root = user_cache_dir("llmcompress")
    path = Path(root, *parts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from ..errors import LLMCompressError

        named = "LLMCOMPRESS_CACHE" if os.environ.get("LLMCOMPRESS_CACHE") else "the user cache folder"
        raise LLMCompressError(f"{named} `{root}` cannot hold `{path.parent}` ({e.strerror or e}). Fix: set "
                               "LLMCOMPRESS_CACHE to a folder you can write.") from None
    return path
