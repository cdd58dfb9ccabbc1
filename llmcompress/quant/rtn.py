"""Round-to-nearest weight-only quantization: the honest baseline every smarter method must beat.

    - {type: quantize, method: rtn, bits: 4, group_size: 64}

Per group of ``group_size`` input weights: min/max (asymmetric) or absmax (symmetric) scale, round, clamp.

Saved as a compressed-tensors ``pack-quantized`` checkpoint (``quant_method: compressed-tensors`` in config.json;
the integers packed in int32, scales in the original's dtype, zero points packed), so the size on disk is real and
plain ``AutoModelForCausalLM.from_pretrained`` (with ``compressed-tensors`` installed) and vLLM load the folder as
the model the run measured. transformers (5.17, compressed-tensors 0.19) keeps the layers packed and dequantizes
each weight in its forward, as rtn's own layers did: a saving in memory, not in time. Vision models and VLMs keep
llmcompress's own layout (``format: rtn``), which ``load_model`` reads and plain ``from_pretrained`` refuses:
compressed-tensors has no scheme for Conv2d layers, and the converter builds causal LMs only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..errors import LLMCompressError, RecipeError
from .base import QuantizeConfig, check_group_size, probe_logits

if TYPE_CHECKING:
    from ..context import RunContext


class RTNConfig(QuantizeConfig):
    """Round-to-nearest weight-only, the baseline: ``{type: quantize, method: rtn, bits: 4, group_size: 64}``."""

    method: Literal["rtn"] = "rtn"
    bits: int = Field(4, description="Bits per weight, 2..8.")
    group_size: int = Field(64, description="Weights sharing one scale; -1 = one scale per output row.")
    symmetric: bool = Field(False, description="absmax scale and no zero point (else min/max with a zero point).")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError("must be between 2 and 8")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return check_group_size(v)

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:

        model, tokenizer = ctx.working_copy()
        names = quantize_rtn_(model, self)
        meta = {"format": "rtn", "rtn": {"bits": self.bits, "group_size": self.group_size,
                                          "symmetric": self.symmetric, "modules": names}}
        return model, tokenizer, {"quantized_modules": len(names), "meta": meta}

    def save_pretrained(self, ctx: "RunContext", model: Any, tokenizer: Any, path: Path, meta: dict) -> tuple:
        """A compressed-tensors ``pack-quantized`` folder (quant/compressed.py: rtn's integers, scales and zero points
        exactly), which transformers and vLLM load as they are; returns it reloaded as later stages see it, after
        checking it computes what ``model`` computed."""
        from ..models.loading import load_model, storage_dtype_of, write_meta
        from ..models.family import kind_of_config
        from .compressed import write_compressed_tensors

        if kind_of_config(model.config.to_dict())[0] != "llm":  # a VLM: the converter builds causal LMs only
            return super().save_pretrained(ctx, model, tokenizer, path, meta)  # own layout, refused by plain loading
        storage = storage_dtype_of(ctx.original.path) or "bfloat16"
        before = probe_logits(model, tokenizer)
        info = write_compressed_tensors(model, tokenizer, path, storage)
        meta = {**meta, "format": "compressed-tensors", "storage_dtype": storage, "compressed_tensors": info["scheme"]}
        write_meta(path, meta)
        reloaded, tokenizer = load_model(path, ctx.runtime.device, ctx.runtime.dtype)
        after = probe_logits(reloaded, tokenizer)
        diff = float((before - after).abs().max())
        # the same dequantized weights in the same dtype; only the kernels' summation order may differ
        if diff > 1e-3 * max(1.0, float(before.abs().max())):
            raise LLMCompressError(f"the rtn model saved as compressed-tensors computes other logits than the "
                                   f"model quantized in memory (max difference {diff:.4g}): not saving it")
        write_meta(path, {**meta, "reload_check": {"max_abs_logit_diff": round(diff, 6),
                                                   "max_abs_logit": round(float(before.abs().max()), 4)}})
        return reloaded, tokenizer



def quantize_rtn_(model, cfg: RTNConfig) -> list[str]:
    """Replace every ``nn.Linear`` not skipped by an RTNLinear, in place. Returns the replaced module names."""
    import torch

    rtn_linear = __getattr__("RTNLinear")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not cfg.skips(n)]
    for name, lin in targets:
        gs = lin.in_features if cfg.group_size == -1 else cfg.group_size
        if lin.in_features % gs:
            raise RecipeError(
                f"group_size {cfg.group_size} does not divide the input width {lin.in_features} of `{name}`. "
                f"Fix: use a divisor of {lin.in_features} (e.g. 64) or -1."
            )
        _set(model, name, rtn_linear.from_linear(lin, cfg.bits, gs, cfg.symmetric))
    if any(n == "lm_head" for n, _ in targets) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # lm_head now has its own (quantized) weights
    return [n for n, _ in targets]


def _set(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _make_rtn_linear():
    import torch
    import torch.nn.functional as F

    class RTNLinear(torch.nn.Module):
        """Packed int weights + per-group scale/zero. ``qweight``: (out, in // (32 // bits)) int32."""

        def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                     bias: bool, dtype=torch.bfloat16):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
            per_word = 32 // bits
            words = -(-in_features // per_word)
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

        @classmethod
        def from_linear(cls, lin: torch.nn.Linear, bits: int, group_size: int, symmetric: bool) -> "RTNLinear":
            w = lin.weight.detach().float()
            out_f, in_f = w.shape
            g = w.reshape(out_f, in_f // group_size, group_size)
            qmax = 2**bits - 1
            if symmetric:
                scale = g.abs().amax(-1).clamp(min=1e-8) / (qmax // 2)
                zero = torch.full_like(scale, (qmax + 1) // 2)
            else:
                lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
                scale = ((hi - lo) / qmax).clamp(min=1e-8)
                zero = (-lo / scale).round().clamp(0, qmax)
            q = (g / scale[..., None] + zero[..., None]).round().clamp(0, qmax).to(torch.int32)
            m = cls(in_f, out_f, bits, group_size, symmetric, lin.bias is not None, dtype=lin.weight.dtype)
            m.qweight.copy_(_pack(q.reshape(out_f, in_f), bits))
            m.scales.copy_(scale.to(m.scales.dtype))
            m.zeros.copy_(zero.to(torch.uint8))
            if lin.bias is not None:
                m.bias.data.copy_(lin.bias.detach())
            return m.to(lin.weight.device)

        def dequantize(self) -> torch.Tensor:
            q = _unpack(self.qweight, self.bits, self.in_features).float()
            q = q.reshape(self.out_features, -1, self.group_size)
            w = (q - self.zeros.float()[..., None]) * self.scales.float()[..., None]
            return w.reshape(self.out_features, self.in_features).to(self.scales.dtype)

        def codes(self) -> torch.Tensor:
            """``q - zero`` per weight, ``(out, groups, group_size)`` int64: the weight is ``codes * scale``."""
            q = _unpack(self.qweight, self.bits, self.in_features).long()
            return q.reshape(self.out_features, -1, self.group_size) - self.zeros.long()[..., None]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

        def extra_repr(self) -> str:
            return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"

    return RTNLinear


def _pack(q, bits: int):
    """(rows, n) ints in [0, 2**bits) -> (rows, ceil(n / (32 // bits))) int32."""
    import torch

    per_word = 32 // bits
    rows, n = q.shape
    pad = (-n) % per_word
    q = torch.nn.functional.pad(q, (0, pad)).reshape(rows, -1, per_word).to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64, device=q.device) * bits
    words = (q << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack(words, bits: int, n: int):
    import torch

    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    q = (words[..., None] >> shifts) & (2**bits - 1)
    return q.reshape(words.shape[0], -1)[:, :n]


_RTN_CLASS = None


def __getattr__(name: str):
    # RTNLinear subclasses torch.nn.Module; build it on first use so importing this file stays torch-free.
    global _RTN_CLASS
    if name == "RTNLinear":
        if _RTN_CLASS is None:
            _RTN_CLASS = _make_rtn_linear()
        return _RTN_CLASS
    raise AttributeError(name)


def load_rtn(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """Rebuild an rtn folder: the architecture from config.json, RTNLinear where the metadata says, then the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ..models.loading import read_meta, to_model_keys, torch_dtype
    from ..utils.tensorfile import no_init
    from ..models.family import auto_model_class

    path = Path(path)
    info = read_meta(path)["rtn"]
    config = AutoConfig.from_pretrained(path)
    with no_init():  # weights come from the checkpoint; skip the random init
        model = auto_model_class(config).from_config(config, dtype=torch_dtype(dtype))
    cls = __getattr__("RTNLinear")
    for name in info["modules"]:
        lin = model.get_submodule(name)
        _set(model, name, cls(lin.in_features, lin.out_features, info["bits"],
                              lin.in_features if info["group_size"] == -1 else info["group_size"],
                              info["symmetric"], lin.bias is not None, dtype=torch_dtype(dtype)))
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    state = to_model_keys(model, state)
    dt = torch_dtype(dtype)  # dense parts may be stored in another dtype than the one we run in
    state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        raise RuntimeError(f"{path}: weights missing from the rtn checkpoint: {missing[:5]}")
    return model.to(device).eval()
