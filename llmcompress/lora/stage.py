"""The ``lora`` stage config and its run: load the student, build the data, init, train, merge, measure merges."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.calibration import CalibrationConfig
from ..data.images import TrainDataConfig
from ..errors import require
from ..stage import StageConfig, StageResult, by_family
from . import INITS, MERGES, OBJECTIVES
from .distributed import AccelerateConfig
from .qat import QATConfig

if TYPE_CHECKING:
    from ..context import RunContext

ADAPTER_DIR = "adapter"  # <stage dir>/adapter: the trained adapter as peft saves it
MERGES_DIR = "merges"  # <stage dir>/merges/<mode>/model: the merge modes measured beside the one passed on
#: peft's shorthand for every linear layer but the output layer.
ALL_LINEAR = "all-linear"


class GenerateConfig(BaseModel):
    """Distill on text the original model writes: each data window's first ``prompt_tokens`` tokens are a prompt, the
    original continues it with ``new_tokens`` sampled tokens, and the student learns the original's distribution on
    prompt + continuation (on-policy for the teacher, no corpus beyond the prompts needed)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    prompt_tokens: int = Field(32, ge=1, description="Tokens of each data window used as the prompt.")
    new_tokens: int = Field(96, ge=1, description="Tokens the original model generates after each prompt.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the original model.")
    batch_size: int = Field(8, ge=1, description="Prompts generated at once.")


class LoraStage(StageConfig):
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

    type: Literal["lora"] = "lora"
    objective: str = Field(description="`distill` (match the original model's next-token distribution, no labels) "
                           "or `sft` (next-token loss on the data; chats: loss on the assistant turns only).")
    data: TrainDataConfig = Field(
        default_factory=lambda: CalibrationConfig(samples=64, seq_len=256),
        description="Training text: source, samples (windows, or rows of a chat .jsonl), seq_len, seed, skip_tokens. "
        "Vision models: images (`{source: builtin:digits, split: train}`; default).",
    )
    generate: GenerateConfig | None = Field(
        None, description="distill only: train on text the original model generates from prompts cut from `data`."
    )
    r: int = Field(16, description="LoRA rank.")
    alpha: float | None = Field(None, description="LoRA alpha (the update is scaled by alpha / r); default: r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(
        ALL_LINEAR, description="`all-linear` (every linear layer but the output layer), or names (`q_proj`) and "
        "regexes over full module names.",
    )
    init: str = Field("default", description="`default`, `loftq` (quantized bases) or `pissa` (dense bases).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule (transformers.get_scheduler)."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps. Give `steps` or `epochs`; default 1 epoch.")
    epochs: float | None = Field(None, gt=0, description="Passes over the data (fractions allowed).")
    batch_size: int = Field(4, ge=1, description="Sequences per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = none.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, slower.")
    temperature: float = Field(1.0, gt=0, description="distill: softmax temperature of both models (loss x T^2).")
    seed: int | None = Field(None, description="Seeds adapter init and data order; default: the recipe's seed.")
    merge: str | list[str] = Field(
        "keep", description="`keep`, `requantize` or `dequantized`; a list builds and measures each (perplexity, KL, "
        "size) and passes the first on to later stages.",
    )
    accelerate: AccelerateConfig = Field(
        default_factory=AccelerateConfig, description="Mixed precision, training processes (torchrun, one per GPU) "
        "and FSDP sharding through 🤗 Accelerate (llmcompress/lora/distributed.py).",
    )
    requantize_from: Literal["original", "dequantized"] = Field(
        "original", description="`merge: requantize` merges into the weights quantize started from (`original`, "
        "QLoRA's usual merge) or into the dequantized base (`dequantized`: the function the adapter was trained on).",
    )

    checkpoint_every: int | None = Field(
        None, ge=1, description="Save the training state (adapter, AdamW, schedule, RNG states, step) every N "
        "optimizer steps, atomically, under `<run folder>/checkpoints/`; running the same command after a kill "
        "resumes the stage from the last one (same recipe, model and settings only). Removed when the stage ends.",
    )
    trackers: list[str] = Field(
        default_factory=list, description="Experiment trackers through 🤗 Accelerate (`log_with`), e.g. "
        "`[tensorboard]` (pip install 'llmcompress[tracking]') or `[wandb]`: the stage config, then each step's "
        "`train/loss` and `train/lr`.",
    )
    logging_dir: str | None = Field(
        None, description="Where the trackers write (accelerate's `project_dir`; relative: to the recipe's folder); "
        "default `<stage folder>/tracking`. TensorBoard: `<logging_dir>/<project_name>/`.",
    )
    project_name: str | None = Field(
        None, description="The trackers' run name (accelerate's `init_trackers(project_name)`); default: the "
        "recipe's name.",
    )

    qat: QATConfig | None = Field(
        None, description="Quantization-aware training (`true`, or `{refit: gptq}`): the forward computes with the "
        "weights `merge: requantize` will write (the merged weight quantized again by bitsandbytes' quantizer, "
        "straight-through gradient), so the requantized model keeps what the adapter learned. bnb-nf4 / bnb-fp4 "
        "bases; `requantize` first in `merge` (llmcompress/lora/qat.py).",
    )

    changes_model: ClassVar[bool] = True

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str) -> str:
        return _known(v, OBJECTIVES)

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        return _known(v, INITS)

    @field_validator("qat", mode="before")
    @classmethod
    def _qat(cls, v: Any) -> Any:
        if v is True:
            return QATConfig()
        if v is False or v is None:
            return None
        if not isinstance(v, (dict, QATConfig)):
            raise ValueError(f"`qat` is true, false or a mapping like {{refit: gptq}}, got {v!r}")
        return v

    @field_validator("r")
    @classmethod
    def _rank(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("the LoRA rank must be > 0 (e.g. 8 or 16)")
        return v

    @field_validator("merge")
    @classmethod
    def _merge(cls, v: str | list[str]) -> str | list[str]:
        modes = [v] if isinstance(v, str) else v
        if not modes:
            raise ValueError("give at least one merge mode, e.g. `keep`")
        for m in modes:
            _known(m, MERGES)
        if len(set(modes)) != len(modes):
            raise ValueError("a merge mode is listed twice")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        from ..utils.patterns import check_regexes

        if isinstance(v, str):
            if v != ALL_LINEAR:
                raise ValueError(f"a single string must be `{ALL_LINEAR}`; list module names instead, e.g. [{v}]")
            return v
        if not v:
            raise ValueError(f"list at least one module name, or use `{ALL_LINEAR}`")
        return check_regexes(v)

    @model_validator(mode="after")
    def _combinations(self) -> "LoraStage":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give `steps` or `epochs`, not both")
        if self.objective != "distill" and self.generate is not None:
            raise ValueError("`generate` needs `objective: distill` (the original model writes the text). "
                             "Fix: remove `generate`, or set `objective: distill`")
        if self.init == "pissa" and self.accelerate.launches:
            raise ValueError("`init: pissa` rewrites the base weights before training, which the separate training "
                             "processes of `accelerate.num_processes`/`fsdp` cannot share. Fix: use `init: default`, "
                             "or train in one process")
        if self.objective != "distill" and self.temperature != 1.0:
            raise ValueError("`temperature` applies to `objective: distill` only. Fix: remove it")
        if self.qat:
            self._check_qat()
        self._check_tracking()
        return self

    def _check_tracking(self) -> None:
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"a tracker is listed twice in `trackers` ({self.trackers}). Fix: list each once")
        if not self.trackers and (self.logging_dir is not None or self.project_name is not None):
            what = "logging_dir" if self.logging_dir is not None else "project_name"
            raise ValueError(f"`{what}` applies to `trackers`, and none is set. Fix: add `trackers: [tensorboard]`, "
                             f"or remove `{what}`")
        if self.checkpoint_every and self.accelerate.fsdp is not None:
            raise ValueError("`checkpoint_every` saves the adapter from one process, and `accelerate.fsdp` shards it "
                             "(not supported together yet). Fix: remove `checkpoint_every`, or `fsdp`")

    def _check_qat(self) -> None:
        others = [m for m in self.merges if m != "requantize"]
        if others:
            raise ValueError(f"`qat: true` trains the model `merge: requantize` writes, and `merge` asks for "
                             f"`{others[0]}` too: that adds the adapter unquantized, a function it was not trained "
                             "for (the straight-through gradient lets it grow freely where the requantization "
                             "rounds it away: on the default model KL 3.1 against 0.045 for the requantized merge). "
                             "Fix: `merge: requantize`, or remove `qat`")
        if self.dropout:
            raise ValueError(f"`qat: true` trains the merged weight, which has no dropout (`dropout` is "
                             f"{self.dropout}). Fix: set `dropout: 0`, or remove `qat`")
        if self.accelerate.launches:
            raise ValueError("`qat: true` trains in one process. Fix: remove `accelerate.num_processes`/`fsdp`, or "
                             "remove `qat`")
        if self.qat.refit and self.qat.refit_samples > self.data.samples:
            raise ValueError(f"`qat.refit_samples` is {self.qat.refit_samples}: the re-fit measures the first windows "
                             f"of the stage's `data`, which has {self.data.samples}. Fix: set `qat.refit_samples` to "
                             f"at most {self.data.samples}, or raise `data.samples`")
        if self.qat.refit and self.init == "loftq":
            raise ValueError("`init: loftq` starts the adapter at the base's rounding error, which a re-fitted "
                             "rounding (`qat: {refit: gptq}`) spreads on purpose so that the errors cancel in the "
                             "layers' outputs; loftq would undo part of that. Fix: use `init: default`")

    # -----------------------------------------------------------------------------------------------------------------

    @property
    def merges(self) -> list[str]:
        """Merge modes in order; the first is the model later stages see."""
        return [self.merge] if isinstance(self.merge, str) else list(self.merge)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r)

    def check_after(self, earlier: list[StageConfig]) -> str | None:
        """Rules across stages (recipe validation): what each merge mode and init needs before it."""
        quant = next((s for s in reversed(earlier) if s.type == "quantize"), None)
        last = next((s for s in reversed(earlier) if s.changes_model), None)
        if last is not None and last is quant and getattr(quant, "method", None) == "gguf":
            return ("the model before it is a GGUF file (quantize:gguf), which llama.cpp runs and torch cannot train "
                    "an adapter on. Fix: put the lora stage before the gguf quantize stage (train and merge on the "
                    "dense model, then quantize), or quantize with a method peft trains on (bnb-nf4, gptq, hqq)")
        if self.qat:
            problem = _qat_after(quant, earlier)
            if problem:
                return problem
        if quant is None and "requantize" in self.merges:
            return ("`merge: requantize` quantizes again with the method of the quantize stage before it, and there "
                    "is none. Fix: add a quantize stage before, or use `keep` / `dequantized`")
        if self.init == "loftq" and quant is None:
            return ("`init: loftq` starts the adapter at the quantization error, and no quantize stage comes before. "
                    "Fix: add one (e.g. bnb-nf4) or use `init: default` / `pissa`")
        if self.init == "loftq" and getattr(quant, "method", None) == "gptq":
            return ("`init: loftq` needs the quantized weights dequantized, which is not implemented for gptq. "
                    "Fix: use `init: default`, or quantize with bnb-nf4 / hqq / torchao")
        if self.init == "pissa" and quant is not None:
            return (f"`init: pissa` rewrites the base weights, which needs float weights, and a stage before "
                    f"quantizes them ({quant.kind}). Fix: use `init: loftq` (its quantized counterpart) or `default`, "
                    "or put the lora stage before the quantize stage")
        earlier_keep = [s for s in earlier if s.type == "lora" and s.merges[0] == "keep"]
        if earlier_keep:
            return ("an earlier lora stage keeps its adapter unmerged (`merge: keep`), and a second adapter cannot go "
                    "on top. Fix: merge the first (`requantize` or `dequantized`)")
        return None

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


def _qat_after(quant: Any, earlier: list[StageConfig]) -> str | None:
    """What `qat: true` needs before it: a bitsandbytes 4-bit quantize stage, and the model still in its format."""
    from .qat import QAT_METHODS

    if quant is None:
        return ("`qat: true` trains against the 4-bit grid of the quantize stage before it, and there is none (a "
                "dense or GGUF model). Fix: add `{type: quantize, method: bnb-nf4}` before the lora stage, or remove "
                "`qat`")
    method = getattr(quant, "method", None)
    if method not in QAT_METHODS:
        return (f"`qat: true` reproduces bitsandbytes' 4-bit quantizer ({', '.join(QAT_METHODS)}), and the quantize "
                f"stage before uses `{method}`. Fix: quantize with bnb-nf4 or bnb-fp4, or remove `qat`")
    after = earlier[len(earlier) - 1 - earlier[::-1].index(quant) + 1:]
    changed = [s for s in after if s.changes_model and not (s.type == "lora" and s.merges[0] == "requantize")]
    if changed:
        return (f"`qat: true` needs the {method} model the quantize stage wrote, and a `{changed[0].kind}` stage "
                "changes it in between. Fix: put the lora stage right after the quantize stage, or remove `qat`")
    return None


def _known(value: str, registry: Any) -> str:
    from ..registry import did_you_mean

    if value not in registry:
        raise ValueError(f"unknown {registry.kind} `{value}`.{did_you_mean(value, registry.names())} "
                         f"Choices: {', '.join(registry.names())}")
    return value
