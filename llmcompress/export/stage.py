"""The export stage: the current model written for its consumer, checked by reloading it, with a model card."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import LLMCompressError
from ..registry import did_you_mean
from ..stage import StageConfig, StageResult, by_family
from . import EXPORT_FORMATS
from .hub import PushToHubConfig

if TYPE_CHECKING:
    from ..context import RunContext

CARD = "README.md"


class ExportStage(StageConfig):
    """Write the model as its consumer loads it, reload it in a fresh process to check it, and add a model card.

    It does not change the model later stages see. It may come anywhere after quantize/prune; the card is written
    with the figures measured so far and refreshed with the final report's when the run ends.

    ```yaml
    - type: export
      format: compressed-tensors   # hf | compressed-tensors | gguf
      path: null                   # output folder; default <stage folder>/model (relative: to the recipe file)
      card: true                   # README.md: how it was made, what was measured, how to load it
      verify: true                 # reload in a fresh process, compare logits with the evaluated model
      push_to_hub: null            # {repo_id: you/name, private: true}: upload folder + card + report at the end
    ```
    """

    type: Literal["export"] = "export"
    format: str = Field("hf", description="hf | compressed-tensors | gguf (`llmcompress ls` lists them).")
    path: str | None = Field(None, description="Output folder; default `<stage folder>/model` inside the run folder.")
    card: bool = Field(True, description="Write a model card (README.md) into the folder.")
    verify: bool = Field(True, description="Reload the export in a fresh process with its consumer; compare logits.")
    dequantize: bool = Field(
        False, description="hf only: write dense weights (bf16 when the source is bf16). For rtn/hqq/torchao-int4wo "
        "folders, which plain `from_pretrained` cannot load; loads anywhere, saves nothing on disk.",
    )
    gguf_type: Literal["f16", "bf16", "q8_0"] | None = Field(
        None, description="gguf only: tensor type of 2-D weights (default f16); norms stay f32.",
    )
    push_to_hub: PushToHubConfig | None = Field(
        None, description="Upload the export, its card, report.json, report.md and plots/ to this hub repo when the "
        "run ends (`llmcompress push` does the same by hand).",
    )

    changes_model: ClassVar[bool] = False

    @classmethod
    def after_report(cls, run_dir: Path, report: dict, console: Any) -> None:
        """Once the run's report is written: cards show the final figures, then `push_to_hub:` exports go up."""
        from . import push_exports, refresh_cards

        refresh_cards(report)
        push_exports(run_dir, report, console)

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in EXPORT_FORMATS:
            names = EXPORT_FORMATS.names()
            raise ValueError(f"unknown export format `{v}`.{did_you_mean(v, names)} Choices: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _options_fit_format(self) -> "ExportStage":
        if self.gguf_type is not None and self.format != "gguf":
            raise ValueError(f"`gguf_type` applies to `format: gguf`, not `{self.format}`. Fix: remove it")
        if self.dequantize and self.format != "hf":
            raise ValueError(f"`dequantize` applies to `format: hf`, not `{self.format}`. Fix: remove it")
        return self

    def check_after(self, earlier: list[StageConfig]) -> str | None:
        """Can this format hold what the earlier stages made? (Recipe validation; no weights load.)"""
        quantize = next((s for s in reversed(earlier) if s.type == "quantize"), None)
        return EXPORT_FORMATS.get(self.format)().check(self, quantize)

    # -----------------------------------------------------------------------------------------------------------------

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from ..utils.io import atomic_dir, folder_size

        exporter = EXPORT_FORMATS.get(self.format)()
        out = self._target(ctx)
        t0 = time.perf_counter()
        with ctx.task(f"export {self.format}"), atomic_dir(out) as tmp:
            info = exporter.export(self, ctx, tmp)
            seconds = time.perf_counter() - t0
            if self.verify:
                with ctx.task(f"reload {self.format} export in a fresh process"):
                    info["reload"] = exporter.verify(self, ctx, tmp, info)
        data: dict[str, Any] = {
            "format": self.format, "path": str(out.resolve()), "consumer": exporter.consumer,
            "library": exporter.library, "export_seconds": round(seconds, 3),
            "size_bytes": folder_size(out), **info,
        }
        data["load_code"] = exporter.load_code(str(out.resolve()), data)
        if self.card:
            from .card import write_card

            data["card"] = CARD
            write_card(out, ctx_report(ctx), data)
        summary = {"format": self.format, "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
        if "reload" in info:
            summary["reload"] = f"max |Δlogit| {info['reload']['max_abs_logit_diff']:.3g}"
        return StageResult(type="export", label=self.label, data=data, summary=summary, artifacts=[str(out.resolve())])

    def preflight(self, base_dir: "Path | None" = None) -> None:
        """A `path:` outside the run folder must be free (or an earlier export), checked before any weights load."""
        if self.path is not None and (base_dir is not None or Path(self.path).expanduser().is_absolute()):
            _check_target(Path(base_dir or ".") / Path(self.path).expanduser())
        if self.push_to_hub is not None:  # a missing token fails now, not after the whole run
            from .hub import check_can_push

            try:
                check_can_push()
            except LLMCompressError as e:
                raise LLMCompressError(f"export `push_to_hub: {self.push_to_hub.repo_id}`: {e}") from None

    def _target(self, ctx: "RunContext") -> Path:
        """The output folder. An existing user folder must be an earlier export (it is replaced), nothing else."""
        if self.path is None:
            return ctx.stage_dir / "model"
        out = ctx.recipe.resolve_path(self.path)
        _check_target(out)
        return out


def _check_target(out: Path) -> None:
    from ..models.loading import read_meta

    try:
        ours = out.is_dir() and "export" in read_meta(out)
    except (OSError, ValueError):
        ours = False
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not ours)):
        raise LLMCompressError(
            f"export path {out} exists and is not an earlier llmcompress export; it would be replaced. "
            "Fix: choose a new folder, or delete it first."
        )
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LLMCompressError(f"export path {out} lies under `{parent}`, which is a file. Fix: choose a "
                                       "folder path.")
            break


def ctx_report(ctx: "RunContext") -> dict:
    """The report of the stages finished so far (what the card can say before the run ends)."""
    from ..pipeline import _model_info, environment, stage_dir_name
    from ..report import build_report

    stages = [{"index": i, "dir": stage_dir_name(i, ctx.recipe.stages[i]),
               "config": ctx.recipe.stages[i].model_dump(mode="json", exclude_none=True),
               "result": result.model_dump(mode="json"), "resumed": False}
              for i, result in sorted(ctx.results.items())]
    return build_report(recipe=ctx.recipe, environment=environment(ctx), stages=stages,
                        original=_model_info(ctx.original), compressed=_model_info(ctx.current))
