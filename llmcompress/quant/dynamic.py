"""PyTorch dynamic int8: int8 weights, activations quantized per batch at run time (``quantize_dynamic``).

    - {type: quantize, method: dynamic-int8, per_channel: true}

Every ``nn.Linear`` not skipped becomes ``torch.ao.nn.quantized.dynamic.Linear``: int8 weights (one scale per output
row with ``per_channel``, else one per layer), fbgemm/x86 int8 matmuls on CPU (measured faster than fp32 here, where
torchao's int8dq falls back to a slow reference kernel). Conv layers are not covered (dynamic quantization has no
conv kernel; that would take static quantization with calibration). Activations run in float32: in a bf16 model the
layers cast around themselves. CPU only. ``torch.ao.quantization`` is marked deprecated upstream (its successor is
torchao, whose int8 dynamic path is ``torchao-int8dq``); it still ships, and works, in torch 2.13.

Saved folder: ``config.json``, safetensors with each quantized layer as ``<layer>.weight_int8`` (int8 (out, in)),
``<layer>.weight_scale`` / ``<layer>.weight_zero_point`` and ``<layer>.bias``, and ``llmcompress.json``
``{"format": "dynamic-int8", "dynamic_int8": {"modules": [...], "per_channel": ...}}``; ``load_model`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ..errors import LLMCompressError, RecipeError
from .base import QuantizeConfig

if TYPE_CHECKING:
    from ..context import RunContext

FORMAT = "dynamic-int8"


class DynamicInt8Config(QuantizeConfig):
    """int8 weights + per-batch int8 activations (PyTorch ``quantize_dynamic``): ``{method: dynamic-int8}``."""

    method: Literal["dynamic-int8"] = "dynamic-int8"
    per_channel: bool = Field(True, description="One weight scale per output row (else one per layer).")
    nominal_bits: ClassVar[float] = 8

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:

        import torch

        if torch.device(ctx.runtime.device).type != "cpu":
            raise RecipeError("dynamic-int8 runs PyTorch's CPU int8 kernels only. Fix: set `device: cpu`, or use "
                              "torchao-int8dq on CUDA.")
        self.ensure_dense(ctx.current)
        model, tokenizer = ctx.working_copy()
        linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        targets = [n for n in linears if not self.skips(n)]
        if not targets:
            raise RecipeError(f"dynamic-int8 found no `nn.Linear` layer to quantize ({len(linears)} linear layers, "
                              f"skip={self.skip}). Fix: loosen `skip`.")
        quantize_dynamic_(model, targets, self.per_channel, ctx.runtime.dtype)
        if "lm_head" in targets and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
        meta = {"format": FORMAT, "dynamic_int8": {"modules": targets, "per_channel": self.per_channel,
                                                    "torch_version": torch.__version__}}
        return model, tokenizer, {"quantized_modules": len(targets),
                                  "skipped_modules": [n for n in linears if n not in targets],
                                  "meta": meta}


def quantize_dynamic_(model: Any, names: list[str], per_channel: bool, model_dtype: str) -> None:
    """Replace the Linear layers ``names`` by dynamic int8 ones, in place, with the save hook on each."""
    import warnings

    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    for name in names:  # the int8 kernels take float32 in and give float32 out
        lin = model.get_submodule(name)
        lin.weight.data = lin.weight.data.float()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice, once per call
        quantize_dynamic(model, {n: qconfig for n in names}, dtype=torch.qint8, inplace=True)
    _finish_layers_(model, names, model_dtype)


def _finish_layers_(model: Any, names: list[str], model_dtype: str) -> None:
    from .torchao import _compute_in_

    for name in names:
        layer = model.get_submodule(name)
        layer.register_state_dict_post_hook(_state_dict_hook)
        _compute_in_(layer, "float32", model_dtype)


def _state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """Plain tensors instead of the packed params (safetensors cannot hold a quantized tensor or a dtype)."""
    import torch

    for key in ("scale", "zero_point", "_packed_params.dtype", "_packed_params._packed_params"):
        state_dict.pop(prefix + key, None)
    w, b = module._packed_params._weight_bias()
    if w.qscheme() == torch.per_channel_affine:
        scale, zero = w.q_per_channel_scales(), w.q_per_channel_zero_points()
    else:
        scale, zero = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
    state_dict[prefix + "weight_int8"] = w.int_repr()
    state_dict[prefix + "weight_scale"] = scale.double()  # torch keeps per-channel scales in float64
    state_dict[prefix + "weight_zero_point"] = zero.long()
    if b is not None:
        state_dict[prefix + "bias"] = b.detach()


def load_dynamic_int8(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """FORMATS["dynamic-int8"]: the architecture, dynamic int8 layers where the metadata says, then the weights."""
    from ..models.loading import read_meta
    from ..models.skeleton import load_swapped

    if device != "cpu":
        raise LLMCompressError(f"`{path}` holds PyTorch dynamic int8 layers, which run on the CPU only. Fix: use "
                               "`device: cpu` for this model, or quantize for the GPU with another method.")
    info = read_meta(Path(path))["dynamic_int8"]

    def swap(model, state, dt) -> dict:
        import torch

        later = {}
        for name in info["modules"]:
            lin = model.get_submodule(name)
            q = torch.ao.nn.quantized.dynamic.Linear(lin.in_features, lin.out_features, dtype=torch.qint8)
            ints = state.pop(f"{name}.weight_int8")
            scale, zero = state.pop(f"{name}.weight_scale"), state.pop(f"{name}.weight_zero_point")
            bias = state.pop(f"{name}.bias", None)
            if info["per_channel"]:
                w = torch._make_per_channel_quantized_tensor(ints, scale.double(), zero, 0)
            else:
                w = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), int(zero[0]))
            q.set_weight_bias(w, None if bias is None else bias.float())
            later[name] = q  # in place after the other weights: its own state-dict loader wants torch.save's form
        return later

    model = load_swapped(path, device, dtype, swap)
    _finish_layers_(model, info["modules"], dtype)
    return model
