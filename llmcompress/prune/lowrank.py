"""Low-rank factorization (``type: prune, method: lowrank``): each chosen ``nn.Linear`` W (out, in) becomes two,
B (out, r) after A (r, in), which hold fewer weights when r (out + in) < out x in. The folder really shrinks.

    - {type: prune, method: lowrank, target: 0.2}
    - {type: prune, method: lowrank, target: 0.2, allocation: rank}
    - {type: prune, method: lowrank, rank_fraction: 0.5, whitening: false}
    - {type: prune, method: lowrank, target: 0.1, calibration: {source: builtin:pydoc, samples: 16, seq_len: 256}}

``whitening: true`` is SVD-LLM (Wang et al., 2024): truncate the SVD of W S, S the Cholesky factor of the calibration
inputs' X^T X, so the truncation minimizes the error of the layer's *outputs* on that text (layer by layer, each
layer calibrated on the outputs of the factorized ones before it). ``whitening: false`` is plain truncated SVD of W,
the baseline. ``target`` (a fraction of all the model's parameters to remove) is met by one share for every
factorized layer (some layers one rank above it, to land on the target within one layer's rank step): by default
(``allocation: params``, SVD-LLM's) every layer loses the same share of its weights; ``allocation: rank`` keeps the
same share of every layer's rank, and layers whose pair would not be smaller stay dense. Embeddings are never
factorized; nor is a Linear that shares its weight with one (a tied lm_head). The folder is llmcompress's own layout
(``format: lowrank``): config.json is the original architecture, llmcompress.json lists each factorized module and
its rank, the pairs are ``<module>.lowrank_a.weight`` and ``<module>.lowrank_b.weight``; ``load_model`` rebuilds it
(``load_lowrank``) and plain ``from_pretrained`` refuses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..data import CalibrationConfig
from ..errors import RecipeError
from ..stage import StageConfig, StageResult, by_family
from ..utils.patterns import check_regexes, matches_any
from .lowrank_plan import plan_for_target, removed, saves  # noqa: F401  (the method's arithmetic, public here)

if TYPE_CHECKING:
    from pathlib import Path

    from ..context import RunContext


class LowRankConfig(StageConfig):
    """Factorize linear layers into low-rank pairs: ``{type: prune, method: lowrank, target: 0.2}``."""

    type: Literal["prune"] = "prune"
    method: Literal["lowrank"] = "lowrank"
    target: float | None = Field(
        None, description="Fraction of the model's parameters to remove, 0 < target < 1 (exclusive with "
        "`rank_fraction`).",
    )
    rank_fraction: float | None = Field(
        None, description="Each factorized layer keeps this share of its full rank min(out, in), 0 < f < 1 "
        "(exclusive with `target`).",
    )
    allocation: Literal["params", "rank"] = Field(
        "params", description="With `target`: `params`, every factorized layer loses the same share of its weights "
        "(SVD-LLM's allocation; square layers are factorized too); `rank`, every layer keeps the same share of its "
        "full rank (square layers pay only below half their rank, so they stay dense first).",
    )
    whitening: bool = Field(
        True, description="true: SVD-LLM (truncate the SVD of W S, S from the calibration inputs); false: plain "
        "SVD of W (the baseline).",
    )
    damp: float = Field(
        0.01, gt=0, le=1, description="Added to X^T X before its Cholesky factor, as a share of its mean diagonal.",
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text whose activations whiten the weights (whitening: true).",
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Linear layers left dense: exact module names, or regexes matched against the full name.",
    )

    changes_model: ClassVar[bool] = True

    @field_validator("target", "rank_fraction")
    @classmethod
    def _fraction(cls, v: float | None, info) -> float | None:
        if v is not None and not 0 < v < 1:
            what = ("0 removes nothing, 1 everything; use e.g. target: 0.2 (a fifth of the parameters)"
                    if info.field_name == "target" else
                    "1 keeps everything, 0 nothing; use e.g. rank_fraction: 0.5 (half of each layer's rank)")
            raise ValueError(f"must be a fraction strictly between 0 and 1 ({what})")
        return v

    @field_validator("skip")
    @classmethod
    def _valid_regexes(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    @model_validator(mode="after")
    def _one_target(self) -> "LowRankConfig":
        if (self.target is None) == (self.rank_fraction is None):
            both = self.target is not None
            raise ValueError(
                "set exactly one of `target` (fraction of the parameters to remove, e.g. target: 0.2) and "
                f"`rank_fraction` (share of each layer's rank kept, e.g. rank_fraction: 0.5); "
                f"{'both are' if both else 'neither is'} set. Fix: {'remove one' if both else 'add one'}"
            )
        if self.rank_fraction is not None and "allocation" in self.model_fields_set:
            raise ValueError("`allocation` shares a `target` among the layers, and `rank_fraction` sets each layer's "
                             "rank directly. Fix: remove `allocation`, or use `target` instead of `rank_fraction`")
        return self

    def preflight(self, base_dir: "Path | None" = None) -> None:
        if self.whitening:
            from ..data import check_calibration

            check_calibration(self.calibration, base_dir)

    def describe(self) -> str:
        how = "svd-llm" if self.whitening else "svd"
        return f"lowrank {how} " + (f"-{self.target:.0%} params" if self.target else f"rank x{self.rank_fraction}")

    # -----------------------------------------------------------------------------------------------------------------

    def targets(self, model) -> dict[str, tuple[int, int]]:
        """``name -> (out, in)`` of the Linear layers that may be factorized: not skipped, not sharing a weight."""
        import torch

        shared: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            shared[id(p)] = shared.get(id(p), 0) + 1
        out = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not matches_any(n, self.skip) and shared[id(m.weight)] == 1}
        if not out:
            raise RecipeError(f"`skip` {self.skip} leaves no linear layer to factorize. Fix: skip fewer layers.")
        return out

    def plan(self, shapes: dict[str, tuple[int, int]], total: int) -> dict[str, int]:
        """The rank of each layer to factorize (layers whose pair would not be smaller are left out)."""
        if self.rank_fraction is not None:
            ranks = {n: max(1, round(self.rank_fraction * min(s))) for n, s in shapes.items()}
            return {n: r for n, r in ranks.items() if saves(r, shapes[n])}
        return plan_for_target(shapes, total, self.target, self.allocation)  # type: ignore[arg-type]

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from .lowrank_run import run_lowrank

        return run_lowrank(self, ctx)


def load_lowrank(path, device: str, dtype: str, **kwargs: Any):
    """FORMATS["lowrank"]: the original architecture, a ``LowRankLinear`` for each module llmcompress.json lists (at
    its rank), then the weights."""
    from pathlib import Path

    from ..models.loading import read_meta
    from ..models.skeleton import load_swapped, set_module
    from .lowrank_layers import LowRankLinear
    from .lowrank_run import FORMAT

    modules = (read_meta(Path(path)).get(FORMAT) or {}).get("modules") or {}

    def swap(model, state, dt) -> None:
        for name, rank in modules.items():
            lin = model.get_submodule(name)
            set_module(model, name, LowRankLinear(lin.in_features, lin.out_features, int(rank),
                                                  bias=lin.bias is not None, dtype=dt))

    return load_swapped(path, device, dtype, swap)
