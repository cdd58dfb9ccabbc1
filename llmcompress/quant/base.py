"""What every quantization method shares: the stage fields, layer skipping, and the save-and-report step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from ..errors import RecipeError
from ..utils.patterns import check_regexes, matches_any
from ..stage import StageConfig, StageResult, by_family

if TYPE_CHECKING:
    import torch

    from ..context import RunContext


def check_group_size(v: int) -> int:
    """A ``group_size`` field: a positive number of input weights per scale, or -1 (one scale per output row)."""
    if v != -1 and v < 1:
        raise ValueError("must be a positive divisor of the layers' input width (e.g. 32, 64), or -1")
    return v


class QuantizeConfig(StageConfig):
    """Base of all quantization methods (``type: quantize``)."""

    type: Literal["quantize"] = "quantize"
    method: str
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Linear layers left unquantized: exact module names, or regexes matched against the full name.",
    )

    changes_model: ClassVar[bool] = True
    #: Nominal bits per weight of quantized layers (for reports).
    nominal_bits: ClassVar[float] = 16

    @field_validator("skip")
    @classmethod
    def _valid_regexes(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    def skips(self, module_name: str) -> bool:
        return matches_any(module_name, self.skip)

    def bits_per_weight(self) -> float:
        """Nominal bits of a quantized weight (before scales and zero points)."""
        return float(getattr(self, "bits", self.nominal_bits))

    def ensure_dense(self, source: Any) -> None:
        """Refuse a source that is already quantized (a pruned dense model is fine, structured-pruned included)."""
        from . import QUANTIZERS

        if source.meta.get("format", "hf") not in ("hf", "structured") or source.meta.get("method") in QUANTIZERS:
            raise RecipeError(
                f"{self.method} quantizes a dense model, but the model here is already `{source.describe()}`. "
                "Fix: put this stage first."
            )

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        """Return ``(model, tokenizer, info)``; the model is saved by ``run``. Implemented by each method."""
        raise NotImplementedError

    def save_pretrained(self, ctx: "RunContext", model: Any, tokenizer: Any, path: Path, meta: dict) -> tuple:
        """Write the quantized model into ``path`` (the stage's temporary model folder); return ``(model, tokenizer)``
        as later stages should see that folder. Default: a ``save_pretrained`` folder with the dense parts in the
        original's storage dtype; the in-memory model is reused as is. Methods whose saving consumes the in-memory
        model (compressed in place) override this and return the folder reloaded."""
        from ..models.loading import save_model, storage_dtype_of

        save_model(model, tokenizer, path, meta, storage_dtype=storage_dtype_of(ctx.original.path))
        return model, tokenizer

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from ..models.loading import param_bytes

        t0 = time.perf_counter()
        with ctx.task(f"quantize {self.method}", total=None):
            model, tokenizer, info = self.quantize(ctx)
        seconds = time.perf_counter() - t0
        meta = {"method": self.method, "config": self.model_dump(mode="json"), "source": ctx.original.describe()}
        meta.update(info.pop("meta", {}))
        with ctx.task("save quantized model"), ctx.new_model_dir() as tmp:
            model, tokenizer = self.save_pretrained(ctx, model, tokenizer, tmp, meta)
        weights = param_bytes(model)
        del model
        # Later stages load the folder, not this model: it may still map the source's weight file (a layer left
        # unquantized), which would keep the whole source resident; and the folder is what users get.
        ctx.set_current(ctx.stage_dir / "model")
        data = {
            "method": self.method,
            "bits": self.bits_per_weight(),
            "quantize_seconds": round(seconds, 3),
            "param_bytes": weights,
            "size_bytes": ctx.current.size_bytes,
            **info,
        }
        summary = {"method": self.method, "time": f"{seconds:.1f}s", "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
        return StageResult(type="quantize", label=self.label, model_dir="model", data=data, summary=summary)


#: Text whose logits a quantize stage compares before saving and after reloading its folder (the reload check).
PROBE_TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog."


def probe_logits(model, tokenizer) -> "torch.Tensor":
    """The model's float32 logits on PROBE_TEXT, on the CPU."""
    import torch

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()
