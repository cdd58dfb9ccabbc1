"""The local lm-eval tasks shipped with llmcompress (task YAMLs, their data and the chat prompts).

Ordinary lm-eval tasks: ``lm_eval run --include_path "$(python -m llmcompress.evals)" --tasks pydoc_ppl ...`` runs them
from any working directory.
"""

from __future__ import annotations

from pathlib import Path


def path() -> Path:
    """This folder: give it to lm-eval as ``--include_path`` (or ``TaskManager(include_path=...)``)."""
    return Path(__file__).resolve().parent
