"""The dispatch hook every stage's ``run`` wears: ``@vision_aware``.

For a vision model the stage hands over to its vision implementation (``VISION_STAGES``); for a vision-language
model the quantize and prune stages run as for an LLM with the vision tower and projector added to ``skip``; for an
LLM nothing changes. Importing this module imports nothing heavy (the stage modules load with every recipe).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..context import RunContext


def model_kind(ctx: "RunContext") -> tuple[str, str | None]:
    """``(kind, task)`` of the run's model: the recipe's explicit ``kind``/``task`` (checked against config.json when
    the recipe loaded), else what the original model's folder says."""
    from .kind import folder_kind

    kind, task = folder_kind(ctx.original.path)
    spec = ctx.recipe.model
    if spec.kind != "auto":
        kind = spec.kind
    return kind, spec.task or task


def vision_aware(run: Callable) -> Callable:
    """Decorate a stage's ``run(self, ctx)``: vision models go to ``VISION_STAGES[self.type]``."""

    @functools.wraps(run)
    def wrapper(self: Any, ctx: "RunContext") -> Any:
        kind, _ = model_kind(ctx)
        if kind == "vision":
            from . import VISION_STAGES

            return VISION_STAGES.get(self.type)(self, ctx)
        if kind == "vlm" and self.type in ("quantize", "prune"):
            from .vlm import run_language_part

            return run_language_part(self, ctx, run)
        return run(self, ctx)

    wrapper.llm_run = run  # type: ignore[attr-defined]
    return wrapper


def llm_run(stage: Any, ctx: "RunContext") -> Any:
    """The stage's own (LLM) ``run``, without the vision hand-over: what a vision implementation calls to reuse it."""
    run = type(stage).run
    return getattr(run, "llm_run", run)(stage, ctx)
