"""The distill stage's settings: what a recipe's ``- type: distill`` block holds, and the rules it must keep (no
torch: read when the recipe loads)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.calibration import CalibrationConfig, as_sources, check_source_list
from ..data.corpora import BUILTIN_PREFIX, check_builtin
from ..stage import StageConfig

#: The largest `top_k` accepted: past this the cache costs as much as full logits (`top_k: null`) and buys nothing.
MAX_TOP_K = 4096
ORIGINAL = "original"


class BudgetConfig(BaseModel):
    """How long the student trains: exactly one of ``minutes``, ``tokens`` or ``steps``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    minutes: float | None = Field(None, description="Wall-clock minutes of training (the schedule runs on elapsed "
                                  "time / budget; the data is cycled when it runs out).")
    tokens: int | None = Field(None, description="Training tokens (sequence tokens, summed over steps).")
    steps: int | None = Field(None, description="Optimizer steps.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetConfig":
        given = {k: v for k, v in (("minutes", self.minutes), ("tokens", self.tokens), ("steps", self.steps))
                 if v is not None}
        if len(given) != 1:
            raise ValueError(f"`budget` takes exactly one of `minutes`, `tokens` or `steps`, got "
                             f"{', '.join(f'`{k}`' for k in given) or 'none'}. Fix: e.g. `budget: {{minutes: 20}}`")
        (key, value), = given.items()
        if value <= 0:
            raise ValueError(f"`budget.{key}` must be > 0, got {value}. Fix: e.g. `budget: {{{key}: "
                             f"{ {'minutes': 20, 'tokens': 200000, 'steps': 300}[key]} }}`")
        return self

    @property
    def kind(self) -> str:
        return "minutes" if self.minutes is not None else "tokens" if self.tokens is not None else "steps"

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


class HeldOutConfig(BaseModel):
    """Held-out text the student is measured on during training: perplexity and KL to the teacher every N steps."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    source: str = Field("builtin:pydoc", description="`builtin:pydoc`, or a .txt / .jsonl (`text`) file (relative "
                        "to the recipe).")
    tokens: int = Field(2048, ge=16, description="Tokens from the start of the text, in windows of `data.seq_len`.")
    every: int = Field(50, ge=1, description="Optimizer steps between measurements (also at the start and the end).")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith(BUILTIN_PREFIX):
            check_builtin(v, "held_out.source")
        elif not v.endswith((".txt", ".jsonl")):
            raise ValueError(f"held_out.source `{v}` must be `builtin:pydoc`, a .txt file or a .jsonl file with a "
                             "`text` field")
        return v


class DistillSettings(StageConfig):
    """The distill stage's settings (``DistillStage`` adds the run; distill/stage.py)."""

    type: Literal["distill"] = "distill"
    teacher: str = Field(ORIGINAL, description="`original` (the run's input model), or the `name:` (or label) of an "
                         "earlier stage whose output model teaches.")
    train: Literal["all", "lora"] = Field("all", description="`all`: every weight of the student; `lora`: an adapter "
                                          "(r, alpha, target_modules), merged into the weights at the end.")
    train_embeddings: bool = Field(True, description="train: all: train the input embeddings (and a tied output "
                                   "layer) too.")
    data: CalibrationConfig | list[CalibrationConfig] = Field(
        default_factory=lambda: CalibrationConfig(samples=512, seq_len=256, skip_tokens=0),
        description="Training text (source, samples, seq_len, seed, skip_tokens), or a list of such sources with "
        "one seq_len: their windows are trained on together (shuffled across sources).")
    top_k: int | None = Field(64, description="Cache the teacher's top-k log-probs per token plus the remaining "
                              "mass as one bucket (the loss is the exact KL between the (k+1)-way distributions); "
                              "null: full logits.")
    cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="How the cached top-k log-probs are stored: float16 (2 bytes; rounding ~1e-3 nats, "
        "negligible against the KL of a pruned model) or float32 (for KLs below ~1e-3, e.g. tiny test models).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models (loss x T^2).")
    hidden_weight: float = Field(0.0, description="> 0: add this times the loss between teacher and student last "
                                 "hidden states (equal hidden sizes only).")
    hidden_loss: Literal["mse", "cosine"] = Field("mse", description="The hidden-state loss: mean squared error, or "
                                                  "1 - cosine similarity per token.")
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(minutes=20),
                                 description="`{minutes: 20}`, `{tokens: 200000}` or `{steps: 300}`; exactly one.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay over the budget (a "
                                                                "minutes budget: over elapsed time / budget).")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = none.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Forward precision. Weights and AdamW always stay fp32 (master weights: AdamW on bf16 "
        "weights loses small updates). `bf16`: autocast the forward to bfloat16; `auto`: bf16 when the run's dtype "
        "is bfloat16, else fp32.")
    held_out: HeldOutConfig | None = Field(None, description="Held-out perplexity and KL to the teacher every "
                                           "`every` steps (result.json and plots/distill.png).")
    checkpoint_every: int | None = Field(None, ge=1, description="Save the training state every N optimizer steps "
                                         "under `<run folder>/checkpoints/`; the same command after a kill resumes.")
    seed: int | None = Field(None, description="Seeds the data order (and a LoRA init); default: the recipe's seed.")
    # train: lora
    r: int = Field(16, ge=1, description="train: lora: the adapter's rank.")
    alpha: float | None = Field(None, gt=0, description="train: lora: alpha (update scaled by alpha / r); default r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="train: lora: dropout on the adapter's input.")
    target_modules: str | list[str] = Field("all-linear", description="train: lora: `all-linear`, or module names "
                                            "and regexes over full names.")

    changes_model: ClassVar[bool] = True

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_TOP_K:
            raise ValueError(f"`top_k` must be between 1 and {MAX_TOP_K}, got {v}. Fix: e.g. `top_k: 64`, or "
                             "`top_k: null` to cache full logits")
        return v

    @field_validator("hidden_weight")
    @classmethod
    def _hidden_weight(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"`hidden_weight` must be >= 0, got {v}. Fix: 0 (logits only) or e.g. 0.1")
        return v

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("`teacher` is empty. Fix: `teacher: original`, or the `name:` of an earlier stage")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        from ..lora.config import check_target_modules

        return check_target_modules(v)

    @field_validator("data")
    @classmethod
    def _data(cls, v: CalibrationConfig | list[CalibrationConfig]) -> CalibrationConfig | list[CalibrationConfig]:
        check_source_list(v, "data")
        return v

    @property
    def data_sources(self) -> list[CalibrationConfig]:
        """``data`` as a list (one entry for a single source)."""
        return as_sources(self.data)

    @property
    def seq_len(self) -> int:
        return self.data_sources[0].seq_len

    @model_validator(mode="after")
    def _combinations(self) -> "DistillSettings":
        lora_only = [k for k in ("r", "alpha", "dropout", "target_modules") if k in self.model_fields_set]
        if self.train == "all" and lora_only:
            raise ValueError(f"`{lora_only[0]}` applies to `train: lora`, and this stage trains all weights. Fix: "
                             f"remove `{lora_only[0]}`, or set `train: lora`")
        if self.train == "lora" and "train_embeddings" in self.model_fields_set:
            raise ValueError("`train_embeddings` applies to `train: all`. Fix: remove it")
        if self.top_k is None and "cache_dtype" in self.model_fields_set:
            raise ValueError("`cache_dtype` applies to the top-k cache, and `top_k: null` caches full logits in the "
                             "teacher's dtype. Fix: remove `cache_dtype`, or set `top_k`")
        if "hidden_loss" in self.model_fields_set and not self.hidden_weight:
            raise ValueError("`hidden_loss` applies when `hidden_weight` > 0. Fix: set `hidden_weight`, or remove it")
        return self

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r)

    def check_after(self, earlier: list[StageConfig]) -> str | None:
        """The teacher must name the original or an earlier stage that writes a model."""
        if self.teacher == ORIGINAL:
            return None
        named = [s for s in earlier if s.name == self.teacher] or [s for s in earlier if s.label == self.teacher]
        if not named:
            labels = [s.label for s in earlier if s.changes_model]
            return (f"`teacher: {self.teacher}` names no earlier stage (a teacher must run before the student "
                    f"trains). Fix: `teacher: original`" + (f", or one of {', '.join(labels)}" if labels else
                                                            ", or give an earlier stage that name with `name:`"))
        if not named[-1].changes_model:
            return (f"`teacher: {self.teacher}` names a {named[-1].type} stage, which writes no model. Fix: name a "
                    "stage that changes the model (quantize, prune, lora, distill), or `teacher: original`")
        if named[-1].kind == "quantize:gguf":
            return (f"`teacher: {self.teacher}` is a GGUF file, which torch cannot run. Fix: name a stage before it, "
                    "or `teacher: original`")
        return None

    def teacher_index(self, stages: list[Any], before: int) -> int | None:
        """The index of the teacher's stage among ``stages[:before]``; None for the original."""
        if self.teacher == ORIGINAL:
            return None
        earlier = list(stages[:before])
        for match in (lambda s: s.name == self.teacher, lambda s: s.label == self.teacher):
            found = [i for i, s in enumerate(earlier) if match(s)]
            if found:
                return found[-1]
        return None
