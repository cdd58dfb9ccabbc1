"""Quantization through llmcompressor's ``oneshot``, saved as compressed-tensors checkpoints (which vLLM serves).

    - {type: quantize, method: llmc-gptq-w4a16, bits: 4, group_size: 64}
    - {type: quantize, method: llmc-awq-w4a16, group_size: 64}
    - {type: quantize, method: llmc-w8a8, smoothing_strength: 0.8}   # null: no SmoothQuant
    - {type: quantize, method: llmc-fp8}                              # CUDA GPU with compute capability >= 8.9 only

Each method builds llmcompressor modifiers (GPTQModifier; AWQModifier + QuantizationModifier; SmoothQuantModifier +
GPTQModifier W8A8 int8; QuantizationModifier FP8_DYNAMIC), runs ``oneshot`` on a copy of the current model in the run's
dtype (float32 on CPUs without native bf16: bf16 calibration there is ~6x slower), and saves with
``save_pretrained(save_compressed=True)``: ``quant_method: compressed-tensors`` in config.json, ``pack-quantized``
(int4/int8 weights packed in int32), ``int-quantized`` (int8) or ``float-quantized`` (fp8). Scales and the dense parts
(embeddings, norms, skipped layers) are stored in the original's dtype (bf16 for SmolLM2), whatever dtype the run
computes in. Plain ``AutoModelForCausalLM.from_pretrained`` (with ``compressed-tensors`` installed) and vLLM load the
folder as is.

On CPU transformers *decompresses* such a folder to dense weights at load, so later stages measure the quantization
error, not a saving in memory or time; W8A8 folders still quantize activations per token on the fly (emulated in
floating point). The stage result says so in ``runs_as``. Calibration text comes from ``calibration:`` (shared with
``gptq`` and ``wanda``). llmcompressor's log (loguru) and progress bars go to ``<stage folder>/llmcompressor.log``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal

from pydantic import Field, field_validator

from ..data.calibration import CalibrationConfig, check_calibration, load_calibration
from ..errors import LLMCompressError, RecipeError, require
from ..stage import StageResult
from .base import QuantizeConfig, check_group_size, probe_logits
from .plan import meta_model, plan_layers

if TYPE_CHECKING:
    import torch

    from ..context import RunContext

LOG_FILE = "llmcompressor.log"
FORMAT = "compressed-tensors"
#: Text whose logits are compared before saving and after reloading the folder (``reload_check`` in the result).


class _LlmcConfig(QuantizeConfig):
    """Shared by the llmcompressor methods: checks, calibration, ``oneshot`` on a copy, compressed save."""

    #: Does the recipe need calibration text (FP8 dynamic does not).
    calibrated: ClassVar[bool] = True
    #: How the reloaded folder runs on CPU (``runs_as`` in the result).
    runs_as_cpu: ClassVar[str] = "dense weights after decompression at load"

    def preflight(self, base_dir: Path | None = None) -> None:
        require("llmcompressor", "llmcompressor", f"Method `{self.method}`")
        require("compressed_tensors", "llmcompressor", f"Method `{self.method}` (transformers loads its folders "
                "through compressed-tensors)")
        if self.calibrated:
            check_calibration(self.calibration, base_dir)  # type: ignore[attr-defined]

    def group_size_or_none(self) -> int | None:
        return None

    def modifiers(self, ignore: list[str]) -> list[Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:

        source = ctx.current
        self.ensure_dense(source)
        self.preflight(ctx.recipe.base_dir)
        config, meta = meta_model(source.path)
        plan = plan_layers(self.skips, config, meta, self.group_size_or_none(), self.calibration_seq_len())
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
        ids = (load_calibration(self.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # type: ignore[attr-defined]
               if self.calibrated else None)
        model, tokenizer = ctx.working_copy()  # oneshot works in place on a private copy
        log = ctx.stage_dir / LOG_FILE
        t0 = time.perf_counter()
        with llmcompressor_output(log, ctx.console):  # imports llmcompressor (~10 s the first time: reported apart)
            import_seconds = time.perf_counter() - t0
            modifiers = self.modifiers(plan["skipped"])
        seconds = run_oneshot_(model, tokenizer, modifiers, ids, log, ctx.console)
        device = ctx.runtime.device
        info = {
            "oneshot_seconds": round(seconds, 3),
            "import_seconds": round(import_seconds, 3),
            "quantized_modules": len(plan["quantized"]),
            "skipped_modules": plan["skipped"],
            "compute": {"device": device, "dtype": str(model.dtype).removeprefix("torch."),
                        "threads": ctx.runtime.threads},
            "runs_as": self.runs_as_cpu if device == "cpu" else "compressed-tensors kernels where transformers has "
            "them, else dense after decompression",
            "log": f"{ctx.stage_dir.name}/{LOG_FILE}",
            "meta": {"format": FORMAT, "llmcompressor": {"modifiers": [type(m).__name__ for m in modifiers],
                                                         "ignore": plan["skipped"]}},
        }
        if ids is not None:
            info["calibration"] = self.calibration.record(ids)  # type: ignore[attr-defined]
        return model, tokenizer, info

    def calibration_seq_len(self) -> int | None:
        return self.calibration.seq_len if self.calibrated else None  # type: ignore[attr-defined]

    def save_pretrained(self, ctx: "RunContext", model: Any, tokenizer: Any, path: Path, meta: dict) -> tuple[Any, Any]:
        """compressed-tensors save (compresses ``model`` in place), then the folder reloaded as later stages see it."""
        from ..models.loading import META, load_model, storage_dtype_of, versions
        from ..utils.io import atomic_write_json

        before = probe_logits(model, tokenizer)
        storage = storage_dtype_of(ctx.original.path)
        with llmcompressor_output(ctx.stage_dir / LOG_FILE, ctx.console):
            cast_dense_parts_(model, storage)
            model.save_pretrained(path, save_compressed=True)
        tokenizer.save_pretrained(path)
        meta = {**meta, "format": FORMAT, "storage_dtype": storage, "versions": versions()}
        atomic_write_json(path / META, meta)
        with llmcompressor_output(ctx.stage_dir / LOG_FILE, ctx.console):  # its load-time progress bars
            reloaded, tokenizer = load_model(path, ctx.runtime.device, ctx.runtime.dtype)
        after = probe_logits(reloaded, tokenizer)
        meta["reload_check"] = {
            "max_abs_logit_diff": round(float((before - after).abs().max()), 6),
            "max_abs_logit": round(float(before.abs().max()), 4),
            "what": "logits of the quantized model before saving vs the saved folder reloaded, on a short probe",
        }
        atomic_write_json(path / META, meta)
        return reloaded, tokenizer

    def run(self, ctx: "RunContext") -> StageResult:
        result = super().run(ctx)
        result.data["reload_check"] = ctx.current.meta.get("reload_check")
        result.data["format"] = FORMAT
        return result


class _WeightOnlyConfig(_LlmcConfig):
    bits: int = Field(4, description="Bits per weight: 4 (W4A16) or 8 (W8A16).")
    group_size: int = Field(
        64, description="Weights sharing one scale; must divide every quantized layer's input width (576 for "
        "SmolLM2: 64 works, 128 does not); -1 = one scale per output channel.",
    )
    symmetric: bool = Field(True, description="Symmetric (no zero point): the form vLLM's Marlin kernels run fastest.")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text the model sees while quantizing (16 x 256 tokens).",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (4, 8):
            raise ValueError("must be 4 or 8 (the weight widths compressed-tensors packs and vLLM's W4A16/W8A16 "
                             "kernels run)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return check_group_size(v)

    def group_size_or_none(self) -> int | None:
        return None if self.group_size == -1 else self.group_size

    def config_groups(self) -> dict:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "strategy": "channel" if self.group_size == -1 else "group",
                   "group_size": None if self.group_size == -1 else self.group_size}
        return {"group_0": {"targets": ["Linear"], "weights": weights}}


class LlmcGPTQConfig(_WeightOnlyConfig):
    """GPTQ via llmcompressor, int weights, bf16 activations: ``{type: quantize, method: llmc-gptq-w4a16}``."""

    method: Literal["llmc-gptq-w4a16"] = "llmc-gptq-w4a16"
    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="Activation ordering: round columns by decreasing activation size. `static` and "
        "`weight` keep groups contiguous (no runtime cost), `group` reorders groups (g_idx), null turns it off.",
    )
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="Added to H's diagonal, as a fraction of its mean.")

    def modifiers(self, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(targets=["Linear"], ignore=ignore, config_groups=self.config_groups(),
                             actorder=self.actorder, dampening_frac=self.dampening_frac)]


class LlmcAWQConfig(_WeightOnlyConfig):
    """AWQ via llmcompressor (activation-aware scaling, then round-to-nearest): ``{method: llmc-awq-w4a16}``."""

    method: Literal["llmc-awq-w4a16"] = "llmc-awq-w4a16"
    n_grid: int = Field(20, ge=1, description="Scale exponents tried per smoothing group (grid search).")
    duo_scaling: bool = Field(True, description="Scales from activations and weights (AutoAWQ's default), not "
                              "activations alone.")

    def modifiers(self, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        # Mappings (which norm/linear scales balance which layers) resolve from the architecture (llama: built in).
        return [AWQModifier(n_grid=self.n_grid, duo_scaling=self.duo_scaling),
                QuantizationModifier(targets=["Linear"], ignore=ignore, config_groups=self.config_groups())]


class LlmcW8A8Config(_LlmcConfig):
    """SmoothQuant + GPTQ, int8 weights per channel and int8 activations per token: ``{method: llmc-w8a8}``."""

    method: Literal["llmc-w8a8"] = "llmc-w8a8"
    smoothing_strength: float | None = Field(
        0.8, gt=0, lt=1, description="SmoothQuant alpha: how much activation range moves into the weights; "
        "null = no SmoothQuant.",
    )
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ dampening, a fraction of H's mean diagonal.")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text the model sees while smoothing and quantizing.",
    )
    nominal_bits: ClassVar[float] = 8
    runs_as_cpu: ClassVar[str] = ("dense weights after decompression at load; activations quantized to int8 per token "
                                  "on the fly (emulated in floating point)")

    def modifiers(self, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        gptq = GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=ignore, dampening_frac=self.dampening_frac)
        if self.smoothing_strength is None:
            return [gptq]
        return [SmoothQuantModifier(smoothing_strength=self.smoothing_strength), gptq]


class LlmcFP8Config(_LlmcConfig):
    """FP8 weights (per channel) and dynamic FP8 activations (per token): ``{method: llmc-fp8}``. Needs a CUDA GPU
    with compute capability >= 8.9 (Ada, Hopper or newer); no calibration data."""

    method: Literal["llmc-fp8"] = "llmc-fp8"
    calibrated: ClassVar[bool] = False
    nominal_bits: ClassVar[float] = 8

    def preflight(self, base_dir: Path | None = None) -> None:
        super().preflight(base_dir)
        import torch

        cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if cap is None or cap < (8, 9):
            found = f"the GPU here has compute capability {cap[0]}.{cap[1]}" if cap else "there is no CUDA GPU here"
            raise RecipeError(
                f"`{self.method}` (FP8 weights and activations) needs a CUDA GPU with compute capability >= 8.9 "
                f"(Ada, Hopper or newer), and {found}. Fix: use `llmc-w8a8` or `torchao-int8dq` on CPU "
                "(int8 weights and activations), or `llmc-gptq-w4a16` for 4-bit weights."
            )

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        if ctx.runtime.device != "cuda":
            raise RecipeError(f"`{self.method}` runs on CUDA only, but this run's device is `{ctx.runtime.device}`. "
                              "Fix: set `device: cuda` (or auto) in the recipe, or use `llmc-w8a8` on CPU.")
        return super().quantize(ctx)

    def modifiers(self, ignore: list[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(targets=["Linear"], scheme="FP8_DYNAMIC", ignore=ignore)]


def load_compressed_tensors(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """Loader of ``format: compressed-tensors`` folders: transformers reads them (decompressing on CPU)."""
    from ..models.loading import _load_hf

    require("compressed_tensors", "llmcompressor", f"Loading `{path}` (a compressed-tensors checkpoint)")
    return _load_hf(path, device, dtype, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Shared with llmcompress.prune.llmcompressor




def run_oneshot_(model, tokenizer, modifiers: list[Any], ids: "torch.Tensor | None", log: Path, console=None) -> float:
    """``llmcompressor.oneshot`` on ``model`` in place, on the calibration windows ``ids`` (samples, seq_len) as they
    are (no shuffling, padding or truncation); returns the seconds it took. Its output goes to ``log``."""
    from ..data.calibration import to_records

    with llmcompressor_output(log, console), _no_pinning_without_accelerator():
        from llmcompressor import oneshot
        from llmcompressor.core import active_session

        data: dict[str, Any] = {}
        if ids is not None:
            from datasets import Dataset

            data = {"dataset": Dataset.from_list(to_records(ids)), "num_calibration_samples": len(ids),
                    "max_seq_length": ids.shape[1], "shuffle_calibration_samples": False}
        t0 = time.perf_counter()
        try:
            oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **data)
        finally:
            active_session().reset()  # llmcompressor keeps a global session holding the model
        return time.perf_counter() - t0


def cast_dense_parts_(model, dtype_name: str | None) -> None:
    """Before a compressed save: store the float parameters in the original's dtype (bf16 for SmolLM2) without
    changing a single quantized integer. Each quantized weight is first replaced by its fake-quantized value
    ``q * scale`` (what the in-memory model computes with: RTN/AWQ keep the raw weight and round in forward; GPTQ has
    already written q * scale), then its scales are cast; the compressor then rounds ``q * scale / bf16(scale)``, which
    is within |q| * 2^-9 < 0.5 of q (|q| <= 128), so it stores q again. The reloaded weights are ``q * bf16(scale)``,
    as a bf16 run would have made them. Everything else (embeddings, norms, skipped layers) is cast as is."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from ..models.loading import torch_dtype

    if dtype_name is None:
        return
    target = torch_dtype(dtype_name)
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is not None:
            with torch.no_grad():
                module.weight.data = forward_quantize(module, module.weight.data, "weight", args)
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != target and not (args is not None and name == "weight"):
                p.data = p.data.to(target)
    model.config.dtype = target


@contextmanager
def _no_pinning_without_accelerator() -> Iterator[None]:
    """Upstream bug (llmcompressor 0.14.0.1): AWQ pins its cached activations (``IntermediatesCache.pin_memory``) to
    speed up host-to-GPU copies, which raises "Cannot access accelerator device when none is available" on a machine
    without one. Pinning only matters for those copies: skip it there."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    old = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = old


@contextmanager
def llmcompressor_output(log: Path, console: Any = None) -> Iterator[None]:
    """Send llmcompressor's output to ``log``: its loguru messages (all of them: llmcompressor adds a stdout sink when
    imported, which is removed), progress bars and warnings (Python-level stdout/stderr). A rich console that follows
    ``sys.stderr`` is pinned to the real one meanwhile, so the run's own progress stays on screen. A failure names
    the log."""
    import sys

    from loguru import logger

    log.parent.mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr
    pin = console is not None and getattr(console, "_file", "") is None
    with open(log, "a", encoding="utf-8") as f:
        if pin:
            console.file = saved[1]
        sys.stdout = sys.stderr = f
        try:
            import llmcompressor  # noqa: F401  (its first import adds a loguru sink on sys.stdout: here, the log)

            logger.remove()
            logger.add(f, level="DEBUG", format="{time:HH:mm:ss.SSS} | {level} | {function} | {message}")
            yield
        except LLMCompressError:
            raise
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {e} (llmcompressor's log: {log})") from e
        finally:
            logger.remove()  # no sink outlives the block (nothing of llmcompressor's reaches the console later)
            sys.stdout, sys.stderr = saved
            if pin:
                console._file = None
