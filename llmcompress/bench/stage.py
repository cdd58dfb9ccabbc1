"""The benchmark stage (skeleton: fields fixed, run() to be implemented)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..stage import StageConfig, StageResult

if TYPE_CHECKING:
    from ..context import RunContext


class BenchmarkStage(StageConfig):
    type: Literal["benchmark"] = "benchmark"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8])

    def run(self, ctx: "RunContext") -> StageResult:
        raise NotImplementedError
