"""The ``lora`` stage: load the student, build the data, init, train, merge, measure merges (settings: config.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import require
from ..stage import StageResult, by_family
from . import MERGES
from .config import ADAPTER_DIR, ALL_LINEAR, MERGES_DIR, GenerateConfig, LoraSettings

if TYPE_CHECKING:
    from ..context import RunContext

__all__ = ["ADAPTER_DIR", "ALL_LINEAR", "MERGES_DIR", "GenerateConfig", "LoraStage"]


class LoraStage(LoraSettings):
    """Train a LoRA adapter on the current model (quantized or not) with peft, then merge it as the recipe says.

    ```yaml
    - type: lora
      objective: distill            # distill (KL to the original, no labels) | sft (next-token loss)
      data: {source: builtin:pydoc, samples: 64, seq_len: 256, skip_tokens: 4096}
      r: 16
      alpha: 16                     # default: r
      dropout: 0.0
      target_modules: all-linear    # all-linear | [q_proj, v_proj] | regexes over full names
      init: default                 # default | loftq | pissa
      lr: 0.0002
      schedule: cosine              # linear | cosine | constant | constant_with_warmup
      warmup_steps: 0
      steps: 40                     # or epochs: 1.0
      batch_size: 4
      grad_accum: 1
      gradient_checkpointing: false
      temperature: 1.0              # distill only
      top_k: null                   # distill: cache the original's top-k log-probs (+ the rest) instead of full logits
      merge: keep                   # keep | requantize | dequantized; a list measures each, passes on the first
      requantize_from: original     # requantize merges into W (original) or into deq(Q) (dequantized)
      qat: null                     # true or {refit: gptq}: train on the weights `merge: requantize` writes
      accelerate: {mixed_precision: "no", num_processes: 1}   # + fsdp: {version: 2} to shard over GPUs
      checkpoint_every: null        # N: save the training state every N steps; a killed run resumes from the last
      trackers: []                  # accelerate's trackers, e.g. [tensorboard] (pip install 'llmcompress[tracking]')
      logging_dir: null             # where trackers write; default <stage folder>/tracking
      project_name: null            # the trackers' run name; default the recipe's name
    ```

    Every step's loss is kept in the result (``loss_curve``, ``lr_curve``) and drawn in the report
    (``plots/lora-loss.png``). Checkpoints live in ``<run folder>/checkpoints/<stage folder>/`` (the stage's own
    folder is replaced when it runs again) and are used only by the same recipe, model and settings
    (lora/checkpoint.py); they are removed when the stage finishes.
    """

    def preflight(self, base_dir: "Path | None" = None) -> None:
        from ..data.calibration import CalibrationConfig, check_calibration

        require("peft", "lora", "The lora stage")
        if self.trackers:
            from .tracking import check_trackers

            check_trackers(self.trackers)
        if isinstance(self.data, CalibrationConfig):  # a missing data file fails before any weights load
            check_calibration(self.data, base_dir)
        else:
            from ..data.images import check_data

            check_data(self.data, base_dir, None, "lora: data")

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from ..utils.memory import collect
        from .train import train_adapter

        t0 = time.perf_counter()
        self.preflight(ctx.recipe.base_dir)
        trained = train_adapter(self, ctx)
        collect()  # the student, its optimizer and the training's freed heap (1.7B NF4: ~2.6 GiB left resident)
        adapter_dir = ctx.stage_dir / ADAPTER_DIR
        merges, measured = self._merge_all(ctx, trained, adapter_dir)
        data = {**trained.data, "merge": self.merges[0], "merges": merges,
                "seconds_total": round(time.perf_counter() - t0, 3)}
        if measured:
            data["merges_measured_with"] = measured
        primary = merges[self.merges[0]]
        summary = {
            "objective": self.objective,
            "loss": f"{trained.data['loss_first']:.4g} -> {trained.data['loss_last']:.4g}",
            "steps": trained.data["steps"],
            "train": f"{trained.data['train_seconds']:.0f}s",
            "adapter": f"{trained.data['adapter_bytes'] / 2**20:.2f} MiB",
            "merge": self.merges[0],
            "size": f"{primary['size_bytes'] / 2**20:.1f} MiB",
        }
        return StageResult(type="lora", label=self.label, model_dir="model", data=data, summary=summary)

    def _merge_all(self, ctx: "RunContext", trained: Any, adapter_dir: Path) -> tuple[dict[str, dict], dict | None]:
        """Build every merge mode (the first into <stage>/model); with several, measure each against the original."""
        from .merge import MergeInputs, measure_merges

        inputs = MergeInputs.from_context(ctx, self, adapter_dir, trained.meta, refit=trained.refit)
        out: dict[str, dict] = {}
        for i, mode in enumerate(self.merges):
            target = ctx.stage_dir if i == 0 else ctx.stage_dir / MERGES_DIR / mode
            t = time.perf_counter()
            with ctx.task(f"lora: merge {mode}"):
                info = MERGES.get(mode)(inputs, target, ctx)
            out[mode] = {**info, "seconds": round(time.perf_counter() - t, 3),
                         "path": str((target / "model").relative_to(ctx.stage_dir))}
        measured = None
        # a re-fitted base is measured beside them: what the re-fit alone does, before the adapter
        extra = {"refit": {"path": str(trained.refit.base.relative_to(ctx.stage_dir))}} if trained.refit else {}
        if len(self.merges) > 1 or extra:
            measured = measure_merges(ctx, out, extra)
            if extra:
                trained.data["qat"]["refit"]["measured"] = {k: v for k, v in extra["refit"].items() if k != "path"}
        return out, measured


