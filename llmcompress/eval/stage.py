"""The evaluate stage (skeleton: fields fixed, run() to be implemented)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..stage import StageConfig, StageResult

if TYPE_CHECKING:
    from ..context import RunContext


class EvaluateStage(StageConfig):
    type: Literal["evaluate"] = "evaluate"
    tasks: list[str] = Field(default_factory=lambda: ["pydoc_ppl", "pydoc_cloze"])
    limit: int | None = Field(None, ge=1)

    def run(self, ctx: "RunContext") -> StageResult:
        raise NotImplementedError
