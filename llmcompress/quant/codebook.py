"""Codebook (non-uniform, k-means) quantization: weight sharing in the spirit of SqueezeLLM.

    - type: quantize
      method: codebook
      bits: 4              # 2..4; 2**bits centroids per codebook
      group_size: null     # null: one codebook per output row; N: one per N consecutive weights of a row
      weighting: fisher    # fisher (SqueezeLLM) | activation (diag(XᵀX) of the inputs) | none (plain k-means)
      calibration: {source: builtin:mixed, samples: 16, seq_len: 256}
      iterations: 20
      skip: [lm_head]

Each codebook holds ``2**bits`` float16 centroids found by weighted 1-D k-means (Lloyd from two starts, the weighted
quantiles and a uniform grid over the row, the better kept; all rows of a layer at once, deterministic) and every
weight is replaced by its nearest centroid. The
k-means weighs each weight's squared error by its sensitivity: SqueezeLLM's diagonal Fisher (the squared gradients of
the LM loss on the calibration windows), or the layer inputs' ``diag(XᵀX)``, or nothing.

Saved as llmcompress's own layout (``format: codebook``): per layer ``<name>.qindex`` (the indices, 8 of them packed
into ``bits`` bytes, uint8) and ``<name>.codebook`` ((out, groups, 2**bits) float16); every other tensor as
``save_pretrained`` writes it. Bits per weight (reported): ``bits + 16 * 2**bits / group`` for the quantized layers.
``load_model`` builds the model from config.json and looks every weight up in its codebook, giving a dense model in
the run's dtype — the model the run measured; plain ``from_pretrained`` refuses the folder (``mark_own_layout``).

Runtimes: none runs these per-channel codebooks natively today. vLLM dropped its SqueezeLLM kernels; llama.cpp's
IQ types are fixed-lattice codebooks shared by the whole model, not learned per channel; SqueezeLLM's own repository
ships CUDA kernels for its fork of the LLaMA code only. Our loader dequantizes, so memory and speed are the dense
model's; the saving is the size on disk (and in transfer). Measured against rtn at matched bits per weight:
docs/notes/issue20-codebook.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..data.calibration import CalibrationConfig, check_calibration
from ..errors import LLMCompressError, RecipeError
from .base import QuantizeConfig, probe_logits

if TYPE_CHECKING:
    from ..context import RunContext


class CodebookConfig(QuantizeConfig):
    """Sensitivity-weighted k-means codebooks: ``{type: quantize, method: codebook, bits: 4, weighting: fisher}``."""

    method: Literal["codebook"] = "codebook"
    bits: int = Field(4, description="Bits per index, 2..4: 2**bits centroids per codebook.")
    group_size: Optional[int] = Field(
        None, description="null: one codebook per output row; N: one per N consecutive weights of a row (must "
        "divide every quantized layer's input width, and hold at least 2**bits weights).",
    )
    weighting: Literal["fisher", "activation", "none"] = Field(
        "fisher", description="fisher: squared LM-loss gradients on the calibration text (SqueezeLLM; a forward and "
        "a backward per window); activation: diag(XᵀX) of the layer inputs (a forward; on SmolLM2 as good or better "
        "at 3 bits); none: plain k-means, no calibration text read (measured far worse: collapses at 3 bits).",
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text the sensitivities are measured on (16 x 256 tokens).",
    )
    iterations: int = Field(20, ge=1, le=1000, description="k-means (Lloyd) iterations after the quantile init.")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 4:
            raise ValueError(f"must be 2, 3 or 4 (2**bits centroids per codebook; 3 and 4 are the measured ones), "
                             f"got {v}")
        return v

    @model_validator(mode="after")
    def _group(self) -> "CodebookConfig":
        g = self.group_size
        if g is not None and g < 1:
            raise ValueError(f"group_size must be null (one codebook per output row) or a positive number of weights "
                             f"per codebook that divides the layers' input width (e.g. 64), got {g}")
        if g is not None and g < 2**self.bits:
            raise ValueError(
                f"group_size {g} holds fewer weights than its codebook's {2**self.bits} centroids (bits {self.bits}). "
                f"Fix: use null (one codebook per row) or a group of at least {2**self.bits} weights, e.g. 64."
            )
        return self

    def preflight(self, base_dir: "Path | None" = None) -> None:
        if self.weighting != "none":
            check_calibration(self.calibration, base_dir)

    def group_of(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        model, tokenizer = ctx.working_copy()
        targets = self.targets(model)
        t0 = time.perf_counter()
        sens, calib = self.sensitivities(ctx, model, tokenizer, targets)
        t1 = time.perf_counter()
        with ctx.task("codebook: k-means per layer", total=len(targets)) as advance:
            stats = quantize_codebook_(model, targets, sens, self, advance)
        bits = sum(s["bits"] for s in stats.values())
        weights = sum(s["weights"] for s in stats.values())
        meta = {"format": "codebook", "codebook": {
            "bits": self.bits, "group_size": self.group_size, "weighting": self.weighting,
            "modules": {n: [m.out_features, m.in_features] for n, m in targets.items()},
            "bits_per_weight": round(bits / weights, 4)}}
        info = {"quantized_modules": len(targets), "bits_per_weight": round(bits / weights, 4),
                "codebook_bytes": bits // 8, "quantized_weights": weights,
                "sensitivity_seconds": round(t1 - t0, 3), "kmeans_seconds": round(time.perf_counter() - t1, 3),
                "meta": meta}
        if calib is not None:
            info["calibration"] = calib
        return model, tokenizer, info

    def targets(self, model: Any) -> dict[str, Any]:
        """name -> nn.Linear to quantize; every width checked before any work, so a bad group fails at once."""
        import torch

        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        targets = {n: m for n, m in linears if not self.skips(n)}
        if not targets:
            raise RecipeError(f"codebook found no `nn.Linear` layer to quantize ({len(linears)} linear layers, "
                              f"skip={self.skip}). Fix: loosen `skip`, or put this stage before other quantize stages.")
        for name, lin in targets.items():
            if lin.in_features % self.group_of(lin.in_features):
                raise RecipeError(
                    f"codebook: group_size {self.group_size} does not divide the input width {lin.in_features} of "
                    f"`{name}`. Fix: use null (one codebook per row) or a divisor of every width (e.g. 64 for "
                    f"SmolLM2's 576 and 1536), or add `{name}` to `skip`."
                )
        return targets

    def sensitivities(self, ctx: "RunContext", model: Any, tokenizer: Any,
                      targets: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
        """name -> (out, in) float32 sensitivity per weight (or None for plain k-means), and the calibration record."""
        from ..data.calibration import load_calibration
        from .codebook_kmeans import fisher_diagonal, input_second_moments

        if self.weighting == "none":
            return {n: None for n in targets}, None
        ids = load_calibration(self.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (N, L)
        with ctx.task(f"codebook: {self.weighting} sensitivities", total=len(ids)) as advance:
            if self.weighting == "fisher":
                sens = fisher_diagonal(model, ids, targets, advance)
            else:
                cols = input_second_moments(model, ids, targets, advance)
                sens = {n: cols[n][None, :].expand(lin.out_features, -1) for n, lin in targets.items()}
        return sens, self.calibration.record(ids)

    def save_pretrained(self, ctx: "RunContext", model: Any, tokenizer: Any, path: Path, meta: dict) -> tuple:
        """The own-layout folder (packed indices + codebooks), reloaded through ``load_codebook`` and checked to
        compute what the in-memory model computed; returns the reloaded (dense) model as later stages see it."""
        from ..models.loading import load_model, save_model, storage_dtype_of, write_meta

        before = probe_logits(model, tokenizer)
        save_model(model, tokenizer, path, meta, storage_dtype=storage_dtype_of(ctx.original.path))
        reloaded, tokenizer = load_model(path, ctx.runtime.device, ctx.runtime.dtype)
        after = probe_logits(reloaded, tokenizer)
        diff = float((before - after).abs().max())
        if diff > 1e-3 * max(1.0, float(before.abs().max())):
            raise LLMCompressError(f"the codebook folder reloads as other logits than the model quantized in memory "
                                   f"(max difference {diff:.4g}): not saving it")
        write_meta(path, {**meta, "reload_check": {"max_abs_logit_diff": round(diff, 6),
                                                   "max_abs_logit": round(float(before.abs().max()), 4)}})
        return reloaded, tokenizer


def quantize_codebook_(model: Any, targets: dict[str, Any], sens: dict[str, Any], cfg: CodebookConfig,
                       advance=lambda *a, **k: None) -> dict[str, dict]:
    """Replace every target ``nn.Linear`` by a CodebookLinear, in place. Returns name -> {bits, weights}."""
    from .codebook_kmeans import layer_bits

    cls = __getattr__("CodebookLinear")
    stats = {}
    for name, lin in targets.items():
        group = cfg.group_of(lin.in_features)
        _set(model, name, cls.from_linear(lin, cfg.bits, group, sens.get(name), cfg.iterations))
        stats[name] = {"bits": layer_bits(lin.out_features, lin.in_features, cfg.bits, group),
                       "weights": lin.out_features * lin.in_features}
        sens[name] = None  # free the sensitivities as we go
        advance()
    if "lm_head" in targets and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # lm_head now has its own (quantized) weights
    return stats


def codebook_fit(weight: Any, sens: Any, bits: int, group: int, iterations: int) -> tuple[Any, Any]:
    """(out, in) weight -> ((out, in // group, 2**bits) float16 codebooks, (out, in) int64 indices)."""
    from .codebook_kmeans import weighted_kmeans

    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(-1, group)  # (out * groups, group): one codebook per row of this view
    s = w.new_ones(w.shape) if sens is None else sens.float().to(w.device).reshape(-1, group)
    codebook, idx = weighted_kmeans(w, s, 2**bits, iterations)
    return codebook.reshape(out_f, in_f // group, 2**bits), idx.reshape(out_f, in_f)


def dequantize(codebook: Any, qindex: Any, in_features: int, bits: int) -> Any:
    """Codebook lookup: ((out, groups, K) float16, packed indices) -> (out, in) float16 weight."""
    from .codebook_kmeans import unpack_indices

    out_f, groups, _ = codebook.shape
    idx = unpack_indices(qindex, bits, in_features).reshape(out_f, groups, in_features // groups)
    return codebook.gather(2, idx).reshape(out_f, in_features)


def _make_codebook_linear():
    import torch
    import torch.nn.functional as F

    from .codebook_kmeans import pack_indices

    class CodebookLinear(torch.nn.Module):
        """``qindex``: (out, ceil(in / 8) * bits) uint8 packed indices; ``codebook``: (out, groups, 2**bits) fp16."""

        def __init__(self, in_features: int, out_features: int, bits: int, group: int, bias: bool, dtype):
            super().__init__()
            self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
            self.register_buffer("qindex", torch.zeros(out_features, -(-in_features // 8) * bits, dtype=torch.uint8))
            self.register_buffer("codebook", torch.zeros(out_features, in_features // group, 2**bits,
                                                         dtype=torch.float16))
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

        @classmethod
        def from_linear(cls, lin, bits: int, group: int, sens, iterations: int) -> "CodebookLinear":
            codebook, idx = codebook_fit(lin.weight, sens, bits, group, iterations)
            m = cls(lin.in_features, lin.out_features, bits, group, lin.bias is not None, lin.weight.dtype)
            m.qindex.copy_(pack_indices(idx, bits))
            m.codebook.copy_(codebook)
            if lin.bias is not None:
                m.bias.data.copy_(lin.bias.detach())
            return m.to(lin.weight.device)

        def dequantize(self) -> torch.Tensor:
            return dequantize(self.codebook, self.qindex, self.in_features, self.bits)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

        def extra_repr(self) -> str:
            return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}"

    return CodebookLinear


_CLASS = None


def __getattr__(name: str):
    # CodebookLinear subclasses torch.nn.Module; built on first use so importing this file stays torch-free.
    global _CLASS
    if name == "CodebookLinear":
        if _CLASS is None:
            _CLASS = _make_codebook_linear()
        return _CLASS
    raise AttributeError(name)


def _set(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_codebook(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """Rebuild a codebook folder as a dense model: the architecture from config.json, every listed layer's weight
    looked up in its codebooks (float16 centroids cast to ``dtype``), the other tensors as saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ..models.family import auto_model_class
    from ..models.loading import read_meta, to_model_keys, torch_dtype
    from ..models.skeleton import resize_structured_
    from ..utils.tensorfile import no_init

    path = Path(path)
    meta = read_meta(path)
    info, dt = meta["codebook"], torch_dtype(dtype)
    config = AutoConfig.from_pretrained(path)
    with no_init():  # weights come from the checkpoint; skip the random init
        model = auto_model_class(config).from_config(config, dtype=dt)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    for name, (_out_f, in_f) in info["modules"].items():
        try:
            codebook, qindex = state.pop(f"{name}.codebook"), state.pop(f"{name}.qindex")
        except KeyError:
            raise LLMCompressError(f"{path}: the codebook checkpoint lacks `{name}.codebook`/`{name}.qindex`, which "
                                   "llmcompress.json lists. Fix: re-run the stage that wrote it.") from None
        state[f"{name}.weight"] = dequantize(codebook, qindex, in_f, info["bits"]).to(dt)
    state = to_model_keys(model, state)
    state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    resize_structured_(model, meta, state, dt)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = sorted(set(model.state_dict()) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings
                                                             else set()))
    if missing:
        raise LLMCompressError(f"{path}: weights missing from the codebook checkpoint: {missing[:5]}")
    return model.to(device).eval()
