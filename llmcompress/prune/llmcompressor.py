"""SparseGPT and Wanda through llmcompressor's ``oneshot`` (SparseGPTModifier / WandaPruningModifier).

    - {type: prune, method: sparsegpt, pattern: "2:4"}
    - {type: prune, method: llmc-wanda, sparsity: 0.5}

The same stage fields (``sparsity`` or ``pattern``, ``skip``, ``calibration``) and the same achieved-sparsity report as
``magnitude`` and ``wanda``; the work is llmcompressor's, layer by layer on the calibration text, in the run's dtype
(float32 on CPUs without native bf16). SparseGPT also updates the weights it keeps (the OBS correction), so it loses
less than Wanda at the same sparsity. ``llmc-wanda`` is llmcompressor's Wanda, for comparison with our ``wanda``.

Saved as an ordinary dense checkpoint (zeros stored as weights, dense parts in the original's dtype): compressed-tensors
0.19 dropped sparse compression, so even a 2:4 model is saved dense (no ``sparsity_config`` in config.json) by
llmcompressor itself. vLLM reads it as a dense model; a 2:4 pattern survives the round trip but saves nothing.
llmcompressor's log goes to ``<stage folder>/llmcompressor.log``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ..data.calibration import CalibrationConfig, check_calibration, load_calibration
from ..errors import RecipeError, require
from .base import PruneConfig, load_dense_copy

if TYPE_CHECKING:
    from ..context import RunContext


class _LlmcPruneConfig(PruneConfig):
    """Shared by the llmcompressor pruners: checks, calibration, ``oneshot`` on a copy."""

    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text whose activations guide the pruning (16 x 256 tokens)."
    )

    #: The llmcompressor modifier class, in ``llmcompressor.modifiers.pruning``.
    modifier: ClassVar[str]

    def preflight(self, base_dir: Path | None = None) -> None:
        require("llmcompressor", "llmcompressor", f"Method `{self.method}`")
        check_calibration(self.calibration, base_dir)

    def modifier_kwargs(self) -> dict[str, Any]:
        return {}

    def prune(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        import torch

        from ..quant.llmcompressor import LOG_FILE, llmcompressor_output, run_oneshot_
        from .layerwise import decoder_layers

        self.preflight(ctx.recipe.base_dir)
        model, tokenizer = load_dense_copy(ctx)
        targets = self.targets(model)  # checks N:M against each input width
        blocks, _ = decoder_layers(model)
        outside = [n for n, _ in targets if not n.startswith(blocks + ".")]
        if outside:
            raise RecipeError(
                f"{self.method} prunes only layers inside the decoder blocks (`{blocks}.*`), not `{outside[0]}`. "
                f"Fix: add `{outside[0]}` to `skip`, or use `method: wanda` or `magnitude`."
            )
        names = {n for n, _ in targets}
        ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in names]
        ids = load_calibration(self.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (N, L)
        log = ctx.stage_dir / LOG_FILE
        t0 = time.perf_counter()
        with llmcompressor_output(log, ctx.console):  # imports llmcompressor (~10 s the first time)
            import_seconds = time.perf_counter() - t0
            import llmcompressor.modifiers.pruning as pruning

            mod = getattr(pruning, self.modifier)(
                sparsity=self.target_sparsity, mask_structure=self.pattern or "0:0", targets=["Linear"],
                ignore=ignore, **self.modifier_kwargs(),
            )
        seconds = run_oneshot_(model, tokenizer, [mod], ids, log, ctx.console)
        # oneshot wraps save_pretrained with llmcompressor's compressed save; this model is dense, so save it as such
        # (no `Attempting to save a model with offloaded modules` detour, no recipe.yaml it cannot read back).
        vars(model).pop("save_pretrained", None)
        info = {
            "pruned": [n for n, _ in targets],
            "modifier": self.modifier,
            "oneshot_seconds": round(seconds, 3),
            "import_seconds": round(import_seconds, 3),
            "compute": {"device": ctx.runtime.device, "dtype": str(model.dtype).removeprefix("torch."),
                        "threads": ctx.runtime.threads},
            "calibration": self.calibration.record(ids),
            "log": f"{ctx.stage_dir.name}/{LOG_FILE}",
        }
        return model, tokenizer, info


class SparseGPTConfig(_LlmcPruneConfig):
    """SparseGPT (Frantar & Alistarh, 2023) via llmcompressor: ``{type: prune, method: sparsegpt, pattern: "2:4"}``."""

    method: Literal["sparsegpt"] = "sparsegpt"
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Added to H's diagonal, as a fraction of its mean.")
    block_size: int = Field(128, ge=1, description="Columns pruned and corrected together.")
    modifier: ClassVar[str] = "SparseGPTModifier"

    def modifier_kwargs(self) -> dict[str, Any]:
        return {"dampening_frac": self.dampening_frac, "block_size": self.block_size}


class LlmcWandaConfig(_LlmcPruneConfig):
    """Wanda via llmcompressor (no weight update): ``{type: prune, method: llmc-wanda, sparsity: 0.5}``."""

    method: Literal["llmc-wanda"] = "llmc-wanda"
    modifier: ClassVar[str] = "WandaPruningModifier"
