"""HQQ (Half-Quadratic Quantization): calibration-free weight-only quantization with hqq's own ``HQQLinear``.

    - {type: quantize, method: hqq, bits: 4, group_size: 64}

Why ``HQQLinear`` directly: transformers' ``HqqConfig`` path is broken upstream (``from_pretrained(...,
quantization_config=HqqConfig(...))`` raises ``NotImplementedError: QuantizationMethod.HQQ is not available yet``
in transformers 5.17), so every ``nn.Linear`` not skipped is swapped for an ``HQQLinear`` here.

Saved folder: ``config.json``, the tokenizer, ``model.safetensors`` holding HQQLinear's encoded state dict (packed
``W_q`` plus per-group ``scale``/``zero`` and its settings encoded as small tensors), and ``llmcompress.json``
``{"format": "hqq", "hqq": {..., "modules": [...]}}``. Plain ``from_pretrained`` cannot rebuild HQQLinear layers;
``llmcompress.models.loading.load_model`` can (``load_hqq``: ``HQQLinear(None, None, initialize=False)`` per listed
module, then ``load_state_dict``).

Pitfalls: ``HQQLinear`` places its tensors on the ``device`` it is built with (hqq's default is "cuda") and its
``.to()``/``.cpu()`` are no-ops, so the device is always passed explicitly and ``model.to(...)`` never moves these
layers. On CPU hqq's PYTORCH backend dequantizes each weight on every forward: HQQ saves memory, not time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..errors import RecipeError, require
from .base import QuantizeConfig

if TYPE_CHECKING:
    from ..context import RunContext


class HQQConfig(QuantizeConfig):
    """HQQ weight-only, no calibration data: ``{type: quantize, method: hqq, bits: 4, group_size: 64}``."""

    method: Literal["hqq"] = "hqq"
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(
        64, description="Weights sharing one scale and zero: a multiple of 8 dividing every layer's width along `axis`."
    )
    axis: Literal[0, 1] = Field(
        1, description="1: groups run along the input width (as rtn/gptq); 0: along the output width."
    )

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < 8 or v % 8:
            raise ValueError(f"must be a positive multiple of 8 (hqq packs groups of 8), e.g. 64, got {v}")
        return v

    def preflight(self, base_dir: "Path | None" = None) -> None:
        require("hqq", "hqq", f"Method `{self.method}`")

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        import time

        from ..models.loading import torch_dtype

        t0 = time.perf_counter()
        import hqq.core.quantize  # noqa: F401  (~10 s on a busy 2-core box: reported apart from the quantize time)

        import_seconds = time.perf_counter() - t0
        model, tokenizer = ctx.working_copy()
        names, skipped = quantize_hqq_(model, self, ctx.runtime.device, torch_dtype(ctx.runtime.dtype))
        from importlib.metadata import version

        meta = {"format": "hqq", "hqq": {"bits": self.bits, "group_size": self.group_size, "axis": self.axis,
                                          "modules": names, "hqq_version": version("hqq")}}
        return model, tokenizer, {"quantized_modules": len(names), "skipped_modules": skipped,
                                  "import_seconds": round(import_seconds, 3), "meta": meta}


def quantize_hqq_(model, cfg: HQQConfig, device: str, compute_dtype) -> tuple[list[str], list[str]]:
    """Swap every ``nn.Linear`` not skipped for an ``HQQLinear``, in place. Returns (quantized, skipped) names.

    All layer widths are checked before any layer is quantized, so a bad ``group_size`` fails at once.
    """
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [(n, m) for n, m in linears if not cfg.skips(n)]
    skipped = [n for n, _ in linears if cfg.skips(n)]
    if not targets:
        raise RecipeError(
            f"hqq found no `nn.Linear` layer to quantize ({len(linears)} linear layers, skip={cfg.skip}). "
            "Fix: loosen `skip`, or put this stage before any other quantize stage."
        )
    for name, lin in targets:
        width, what = (lin.in_features, "input") if cfg.axis == 1 else (lin.out_features, "output")
        if width % cfg.group_size:
            raise RecipeError(
                f"group_size {cfg.group_size} does not divide the {what} width {width} of `{name}` (axis {cfg.axis}). "
                f"Fix: use a multiple of 8 that divides {width} (e.g. 64 for SmolLM2's 576), or add `{name}` to `skip`."
            )
    qcfg = BaseQuantizeConfig(nbits=cfg.bits, group_size=cfg.group_size, axis=cfg.axis)
    for name, lin in targets:
        _set(model, name, HQQLinear(lin, qcfg, del_orig=True, compute_dtype=compute_dtype, device=device))
    if any(n == "lm_head" for n, _ in targets) and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # lm_head now has its own (quantized) weights
    return [n for n, _ in targets], skipped


def load_hqq(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """Rebuild an hqq folder: the architecture from config.json, empty HQQLinear where the metadata says, weights."""
    import torch
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file

    from ..models.loading import read_meta, to_model_keys, torch_dtype
    from ..models.skeleton import resize_structured_

    path = Path(path)
    meta = read_meta(path)
    info = meta["hqq"]
    model = empty_model(path, torch_dtype(dtype))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    state = to_model_keys(model, state)
    resize_structured_(model, meta, state, torch_dtype(dtype))  # a structured-pruned source: its dense layers' shapes
    for name in info["modules"]:
        _set(model, name, HQQLinear(None, None, compute_dtype=torch_dtype(dtype), device=device, initialize=False))
    # dense parts may be stored in another dtype (the original's) than the one we run in; HQQ's own tensors are
    # converted below, after hqq has decoded them
    dt, hqq_keys = torch_dtype(dtype), tuple(f"{name}." for name in info["modules"])
    state = {k: v.to(dt) if v.is_floating_point() and not k.startswith(hqq_keys) else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)  # HQQLinear places its tensors on `device`
    for name in info["modules"]:
        _hqq_as_dtype(model.get_submodule(name), dt)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"{path}: weights missing from the hqq checkpoint: {missing[:5]}")
    return model.to(device).eval()  # moves the rest; HQQLinear's tensors are already on `device`


def _hqq_as_dtype(layer, dtype) -> None:
    """Make a loaded HQQLinear compute in ``dtype``: hqq dequantizes in ``meta["compute_dtype"]`` with the saved
    scale/zero, whatever ``compute_dtype`` it was built with, and a mismatch with the activations fails in matmul."""
    if layer.meta["compute_dtype"] == dtype:
        return
    layer.compute_dtype = layer.meta["compute_dtype"] = dtype
    for key in ("scale", "zero"):
        if layer.meta.get(key) is not None and layer.meta[key].is_floating_point():
            layer.meta[key] = layer.meta[key].to(dtype)
    if layer.bias is not None:
        layer.bias = layer.bias.to(dtype)


def empty_model(path: Path, dtype):
    """The architecture of ``path``/config.json with parameters on the meta device: no memory and no random init
    (a bf16 skeleton would raise the load's peak memory by the dense model's size). Buffers (rotary tables) stay
    real. Attach weights with ``load_state_dict(..., assign=True)``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..models.family import auto_model_class

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        return auto_model_class(config).from_config(config, dtype=dtype)


def _set(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
