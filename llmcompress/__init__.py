"""llmcompress: recipe-driven LLM compression that reports what it cost and what it bought.

Python API::

    from llmcompress import load_recipe, run_recipe
    report = run_recipe(load_recipe("recipes/quickstart.yaml"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_recipe", "run_recipe", "Recipe", "__version__"]

if TYPE_CHECKING:
    from .pipeline import run_recipe
    from .recipe import Recipe, load_recipe


def __getattr__(name: str) -> Any:
    # Lazy: `import llmcompress` stays light (no torch, lm_eval, gradio or vllm).
    if name in ("load_recipe", "Recipe"):
        from . import recipe

        return getattr(recipe, name)
    if name == "run_recipe":
        from .pipeline import run_recipe

        return run_recipe
    raise AttributeError(f"module 'llmcompress' has no attribute {name!r}")
