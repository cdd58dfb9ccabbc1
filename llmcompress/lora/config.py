"""The lora stage's settings: what a recipe's ``- type: lora`` block holds, and the rules it must keep.

Every module of the stage reads its settings from here (``LoraSettings``, ``AccelerateConfig``, ``QATConfig``); this
module imports none of them, so they form no import circle. ``lora/stage.py`` adds the run to these settings.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.calibration import CalibrationConfig
from ..data.images import TrainDataConfig
from ..errors import RecipeError
from ..stage import StageConfig
from . import INITS, MERGES, OBJECTIVES

class FSDPConfig(BaseModel):
    """accelerate's ``FullyShardedDataParallelPlugin`` settings (CUDA only: accelerate has no CPU FSDP)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1, 2] = Field(2, description="FSDP2 (fully_shard, DTensor) or FSDP1.")
    auto_wrap_policy: Literal["transformer_based_wrap", "size_based_wrap", "no_wrap"] = Field(
        "transformer_based_wrap", description="What becomes one FSDP unit: each decoder layer (the model's "
        "`_no_split_modules`), modules over `min_num_params`, or the whole model.")
    transformer_layer_cls_to_wrap: list[str] | None = Field(None, description="Layer class names (default: the "
                                                            "model's own, e.g. LlamaDecoderLayer).")
    min_num_params: int | None = Field(None, ge=1, description="size_based_wrap: parameters per unit.")
    reshard_after_forward: bool = Field(True, description="Free gathered weights after forward (FULL_SHARD); false "
                                        "keeps them until backward (SHARD_GRAD_OP: faster, more memory).")
    cpu_offload: bool = Field(False, description="Keep parameters on CPU between uses (fits larger models, slower).")
    activation_checkpointing: bool = Field(False, description="Recompute activations per FSDP unit.")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        "FULL_STATE_DICT", description="How the adapter is gathered for saving (full: rank 0 writes a plain file).")

    @model_validator(mode="after")
    def _policy(self) -> "FSDPConfig":
        if self.auto_wrap_policy != "size_based_wrap" and self.min_num_params is not None:
            raise ValueError("`min_num_params` applies to `auto_wrap_policy: size_based_wrap`. Fix: remove it")
        return self

    def plugin(self) -> Any:
        """The accelerate plugin these settings describe."""
        from accelerate import FullyShardedDataParallelPlugin

        kwargs: dict[str, Any] = {
            "fsdp_version": self.version, "auto_wrap_policy": self.auto_wrap_policy,
            "cpu_offload": self.cpu_offload, "activation_checkpointing": self.activation_checkpointing,
            "state_dict_type": self.state_dict_type,
        }
        if self.version == 2:
            kwargs["reshard_after_forward"] = self.reshard_after_forward
        else:  # accelerate 1.15 fills FSDP1's `sharding_strategy` from a default that wins over reshard_after_forward
            kwargs["sharding_strategy"] = "FULL_SHARD" if self.reshard_after_forward else "SHARD_GRAD_OP"
            kwargs["use_orig_params"] = True  # frozen base + trainable adapter in one unit (FSDP1 needs it for that)
        if self.transformer_layer_cls_to_wrap:
            kwargs["transformer_cls_names_to_wrap"] = list(self.transformer_layer_cls_to_wrap)
        if self.min_num_params:
            kwargs["min_num_params"] = self.min_num_params
        return FullyShardedDataParallelPlugin(**kwargs)


class AccelerateConfig(BaseModel):
    """How the lora stage trains: precision, processes, sharding (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast the forward passes.")
    num_processes: int = Field(1, ge=1, description="Training processes on this machine (one per GPU).")
    fsdp: FSDPConfig | None = Field(None, description="Shard the model over the processes' GPUs (CUDA only).")
    main_process_port: int | None = Field(None, ge=1024, le=65535, description="torchrun rendezvous port "
                                          "(default: a free one).")

    @property
    def launches(self) -> bool:
        """Whether training needs processes of its own (torchrun)."""
        return self.num_processes > 1 or self.fsdp is not None

    def check_device(self, device: str, where: str = "lora") -> None:
        """What the hardware must offer (checked when the stage starts, before any weights load)."""
        if not device.startswith("cuda"):
            if self.fsdp is not None:
                raise RecipeError(f"{where}: `accelerate.fsdp` shards the model over GPUs, and this run is on "
                                  f"{device} (accelerate has no CPU FSDP). Fix: remove `fsdp` here; "
                                  "`num_processes: 2` trains data-parallel on CPU")
            if self.mixed_precision == "fp16":
                raise RecipeError(f"{where}: `accelerate.mixed_precision: fp16` needs a GPU. Fix: use bf16 on CPU")
            return
        import torch

        if torch.cuda.device_count() < self.num_processes:
            raise RecipeError(f"{where}: `accelerate.num_processes: {self.num_processes}` needs that many GPUs, "
                              f"{torch.cuda.device_count()} are visible. Fix: lower it (in a Ray sweep, set "
                              f"executor.num_gpus: {self.num_processes})")


#: The quantize methods whose grid `qat` reproduces exactly (bitsandbytes' 4-bit quantizer).
QAT_METHODS = ("bnb-nf4", "bnb-fp4")


class QATConfig(BaseModel):
    """``qat: true`` (= ``qat: {}``) or ``qat: {refit: gptq}`` in a lora stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    refit: Literal["gptq"] | None = Field(
        None, description="`gptq`: before training, re-fit the base's rounding (GPTQ into the same 4-bit grid, on "
        "the stage's `data`; llmcompress/lora/refit.py); the adapter then trains on, and merges into, the re-fitted "
        "weights. null: train on the quantize stage's rounding.",
    )
    refit_samples: int = Field(64, ge=1, description="refit: windows of the stage's `data` GPTQ measures the layer "
                               "inputs on (the first ones).")
    refit_clip: float = Field(0.7, gt=0, le=1, description="refit: each block's scale is searched from its absmax "
                              "down to this share of it, in steps of 0.05 (the scale whose rounding errs least, "
                              "weighted by the inputs' energy, wins; the clipped weight's error goes to the columns "
                              "GPTQ has not rounded yet). 1: keep bitsandbytes' absmax.")

    def clip_factors(self) -> tuple[float, ...]:
        """The scale factors the re-fit tries: 1, 0.95, ... down to ``refit_clip``."""
        steps = int((1 - self.refit_clip) / 0.05 + 1e-9)  # never below refit_clip
        return tuple(round(1 - 0.05 * i, 4) for i in range(steps + 1))


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


class LoraSettings(StageConfig):
    """The lora stage's settings and their checks (``LoraStage`` adds the run; lora/stage.py)."""

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
    top_k: int | None = Field(None, ge=1, le=4096, description="distill: cache only the original's top-k "
                              "log-probs per token plus the rest's mass (distill/topk.py: the exact KL between the "
                              "(k+1)-way distributions, k x 6 bytes a token); null: its full logits.")
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
        return check_target_modules(v)

    @model_validator(mode="after")
    def _combinations(self) -> "LoraSettings":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give `steps` or `epochs`, not both")
        if self.objective != "distill" and self.generate is not None:
            raise ValueError("`generate` needs `objective: distill` (the original model writes the text). "
                             "Fix: remove `generate`, or set `objective: distill`")
        if self.init == "pissa" and self.accelerate.launches:
            raise ValueError("`init: pissa` rewrites the base weights before training, which the separate training "
                             "processes of `accelerate.num_processes`/`fsdp` cannot share. Fix: use `init: default`, "
                             "or train in one process")
        if self.objective != "distill" and self.top_k is not None:
            raise ValueError("`top_k` applies to `objective: distill` only. Fix: remove it")
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


def _qat_after(quant: Any, earlier: list[StageConfig]) -> str | None:
    """What `qat: true` needs before it: a bitsandbytes 4-bit quantize stage, and the model still in its format."""
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


def check_target_modules(v: str | list[str]) -> str | list[str]:
    """``target_modules``: `all-linear`, or module names and regexes (ValueError with the fix otherwise)."""
    from ..utils.patterns import check_regexes

    if isinstance(v, str):
        if v != ALL_LINEAR:
            raise ValueError(f"a single string must be `{ALL_LINEAR}`; list module names instead, e.g. [{v}]")
        return v
    if not v:
        raise ValueError(f"list at least one module name, or use `{ALL_LINEAR}`")
    return check_regexes(v)


def _known(value: str, registry: Any) -> str:
    from ..registry import did_you_mean

    if value not in registry:
        raise ValueError(f"unknown {registry.kind} `{value}`.{did_you_mean(value, registry.names())} "
                         f"Choices: {', '.join(registry.names())}")
    return value
