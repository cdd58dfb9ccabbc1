"""Sweeps: one base recipe, a grid and/or a list of overrides, run on an executor, judged on one leaderboard.

    llmcompress sweep recipes/sweeps/smollm2-methods.yaml [--executor local|ray] [--address ray://head:10001]

Python: ``from llmcompress.sweep import run_sweep; summary = run_sweep("recipes/sweeps/x.yaml")``.
Executors are registry entries (``local``, ``ray``), imported on first use.
"""

from __future__ import annotations

from typing import Any

from .executors import EXECUTORS


def run_sweep(*args: Any, **kwargs: Any) -> dict:
    """See ``llmcompress.sweep.runner.run_sweep``."""
    from .runner import run_sweep as run

    return run(*args, **kwargs)


__all__ = ["EXECUTORS", "run_sweep"]
