"""bitsandbytes NF4 / FP4 / int8 through transformers' ``BitsAndBytesConfig`` (quantized while loading).

    - {type: quantize, method: bnb-nf4, double_quant: true}

On CPU bnb 0.50 runs NF4/FP4 and int8; they save memory, not time: on an AVX2-only 2-core box NF4 decoded at 0.21x
the bf16 speed at batch 1 (the benchmark stage measures it on yours). Never merge a LoRA into a bnb 4-bit model in
place on CPU: after a forward pass it corrupts the weights.

Upstream bug worked around (bitsandbytes 0.50.2): on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids) the first
inference forward of a ``Linear4bit`` repacks its weight for the CPU kernel, and the repacking fails
(``shape '[N, 0]' is invalid``) when the input width is not a multiple of the block size or the output width not a
multiple of 32; ``keep_bnb_cpu_packing_to_packable_`` leaves those layers on the plain path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ..errors import require
from ..models.loading import bnb_cannot_repack, keep_bnb_cpu_packing_to_packable_  # noqa: F401 - applied on load
from .base import QuantizeConfig

if TYPE_CHECKING:
    from pathlib import Path

    from ..context import RunContext


class _BnbConfig(QuantizeConfig):
    def preflight(self, base_dir: "Path | None" = None) -> None:
        require("bitsandbytes", "bnb", f"Method `{self.method}`")

    def bnb_config(self, compute_dtype: Any):  # pragma: no cover - overridden
        raise NotImplementedError

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        from ..models.loading import load_model, torch_dtype

        source = ctx.current
        self.ensure_dense(source)
        cfg = self.bnb_config(torch_dtype(ctx.runtime.dtype))
        model, tokenizer = load_model(source.path, ctx.runtime.device, ctx.runtime.dtype, quantization_config=cfg)
        skipped = [n for n, _ in model.named_modules() if n and self.skips(n) and _is_linear(_get(model, n))]
        quantized = sum(1 for _, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
        return model, tokenizer, {"quantized_modules": quantized, "skipped_modules": skipped}


def _get(model, name):
    return model.get_submodule(name)


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)


class BnbNF4Config(_BnbConfig):
    """4-bit NormalFloat (QLoRA's format): ``{type: quantize, method: bnb-nf4}``."""

    method: Literal["bnb-nf4"] = "bnb-nf4"
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bits/param saved).")
    _quant_type: ClassVar[str] = "nf4"
    nominal_bits: ClassVar[float] = 4

    def bnb_config(self, compute_dtype: Any):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self._quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage="uint8",
            llm_int8_skip_modules=list(self.skip) or None,
        )


class BnbFP4Config(BnbNF4Config):
    """4-bit float: ``{type: quantize, method: bnb-fp4}``."""

    method: Literal["bnb-fp4"] = "bnb-fp4"  # type: ignore[assignment]
    _quant_type: ClassVar[str] = "fp4"


class BnbInt8Config(_BnbConfig):
    """LLM.int8() with outlier decomposition: ``{type: quantize, method: bnb-int8, threshold: 6.0}``."""

    method: Literal["bnb-int8"] = "bnb-int8"
    threshold: float = Field(6.0, gt=0, description="Activation magnitude above which a column runs in 16-bit.")
    nominal_bits: ClassVar[float] = 8

    def bnb_config(self, compute_dtype: Any):
        import warnings

        from transformers import BitsAndBytesConfig

        # bnb warns on every int8 matmul that bf16 inputs are cast to fp16; once per run is enough.
        warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=self.threshold, llm_int8_skip_modules=list(self.skip) or None
        )
