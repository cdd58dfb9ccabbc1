"""Stage configs and results. A stage is a pydantic config (validated when the recipe loads) with a ``run(ctx)`` method.

Every stage type is registered here once, lazily, so that reading a recipe never imports torch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .registry import Registry

if TYPE_CHECKING:
    from pathlib import Path

    from .context import RunContext

STAGES: Registry = Registry("stage type")
STAGES.register_lazy("quantize", "llmcompress.quant:QuantizeStage")
STAGES.register_lazy("prune", "llmcompress.prune:PruneStage")
STAGES.register_lazy("lora", "llmcompress.lora.stage:LoraStage")
STAGES.register_lazy("evaluate", "llmcompress.eval.stage:EvaluateStage")
STAGES.register_lazy("benchmark", "llmcompress.bench.stage:BenchmarkStage")
STAGES.register_lazy("export", "llmcompress.export.stage:ExportStage")
STAGES.register_lazy("distill", "llmcompress.distill.stage:DistillStage")
#: Stage types whose `method:` picks the config class: their method registries (a recipe is checked against them).
METHODS: Registry = Registry("stage type with methods")
METHODS.register_lazy("quantize", "llmcompress.quant:QUANTIZERS")
METHODS.register_lazy("prune", "llmcompress.prune:PRUNERS")


def by_family(run: Callable) -> Callable:
    """Decorate a stage type's ``run(self, ctx)``: the run's model family (``ctx.family``) runs the stage, its own
    way (a vision model) or through ``run`` as written (an LLM)."""

    @functools.wraps(run)
    def wrapper(self: Any, ctx: "RunContext") -> Any:
        return ctx.family.run_stage(self, ctx, run)

    wrapper.generic_run = run  # type: ignore[attr-defined]
    return wrapper


def generic_run(stage: Any, ctx: "RunContext") -> Any:
    """The stage type's own ``run``, without the family's hand-over: what a family's implementation calls to reuse
    it."""
    run = type(stage).run
    return getattr(run, "generic_run", run)(stage, ctx)


class StageConfig(BaseModel):
    """Base of every stage. Subclasses set ``type: Literal[...]`` and implement ``run``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str | None = Field(None, description="Optional label shown in progress and reports.")

    #: True when the stage changes the model; its output model is saved in the stage folder.
    changes_model: ClassVar[bool] = False
    #: True when the model it writes has another architecture (sizes in config.json): the original's config.json no
    #: longer describes the model the stages after it get.
    reshapes_model: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def kind(self) -> str:
        method = getattr(self, "method", None)
        return f"{self.type}:{method}" if method else self.type  # type: ignore[attr-defined]

    def check_after(self, earlier: list["StageConfig"]) -> str | None:
        """A problem with running this stage after ``earlier`` (recipe validation, no weights), or None."""
        return None

    def check_model(self, model_dir: "Path") -> None:
        """Checks against the model's config.json (no weights), called at validation for the stages up to the
        first one that reshapes the model. Raise RecipeError."""

    def preflight(self, base_dir: "Path | None" = None) -> None:
        """Cheap checks before any weights load (installed extras, hardware, files the stage reads; ``base_dir``: the
        recipe's folder, where relative paths point). Raise RecipeError/MissingExtraError."""

    @classmethod
    def after_report(cls, run_dir: "Path", report: dict, console: Any) -> None:
        """Called once per stage type of a run after report.json is written (export: refresh cards, push)."""

    def run(self, ctx: "RunContext") -> "StageResult":  # pragma: no cover - abstract
        raise NotImplementedError


class StageResult(BaseModel):
    """What a finished stage leaves in ``<stage dir>/result.json``."""

    model_config = ConfigDict(extra="forbid")

    type: str
    label: str
    seconds: float = 0.0
    #: Peak resident memory of the run's process during this stage (bytes; child processes such as a vLLM server
    #: are not counted), and of CUDA memory allocated by torch when the stage used a GPU.
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    #: Folder (relative to the stage folder) holding the model this stage produced, if any.
    model_dir: str | None = None
    #: Files or folders the stage wrote elsewhere (absolute paths); resume redoes the stage when one is gone.
    artifacts: list[str] = Field(default_factory=list)
    #: Stage-specific figures. evaluate/benchmark: {"original": {...}, "compressed": {...}, "settings": {...}}.
    data: dict[str, Any] = Field(default_factory=dict)
    #: One line per figure for the end-of-run summary table.
    summary: dict[str, Any] = Field(default_factory=dict)
