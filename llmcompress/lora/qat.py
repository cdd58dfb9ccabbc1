"""Quantization-aware LoRA (``qat: true``): train the adapter on the model ``merge: requantize`` will write.

A recovery adapter trained on the quantized model learns corrections of ``deq(Q0)``; most are smaller than half a
4-bit step, so merging them and quantizing again rounds them away (docs/notes/issue4-lora.md). In QAT mode every
adapted layer computes, in the forward pass, with exactly the weight that merge writes::

    W     = S + s·B@A         # (out, in) fp32; S = deq(Q0) (`requantize_from: dequantized`) or the weights the
                              # quantize stage started from (`original`); A, B rounded as the adapter is stored
    W_eff = Q(W)              # bitsandbytes' 4-bit quantizer with the layer's blocksize, quant_type, double
                              # quantization and storage type, on W cast to the storage dtype and back to the run's
                              # dtype, as the merge saves and reloads it
    y     = Linear4bit(W_eff)(x)   # the merged layer's own forward: same bnb class, flags, kernel

and the gradient skips the rounding (straight-through estimator): ``dL/dW = dL/dW_eff``. That is the plain LoRA
gradient taken at the quantized forward, so the LoRA branch computes it, with its value taken out::

    y = y_q + (z - z.detach())     # z = s·B(A(x.detach())): adds exactly 0, carries dL/dA and dL/dB;
                                   # dL/dx = g·W_eff, through the merged layer, as in the model that ships

``merge: requantize`` then reproduces the trained forward bit for bit (tests/unit/test_lora_qat.py). 4-bit layers
without an adapter are requantized once from ``S``, as the merge does. The quantizer is bitsandbytes' CPU kernel
re-written with a 15-comparison bucketize (torch's bucketize is the slow part: 4x); ``quantize_4bit`` checks it
against ``bitsandbytes.functional.quantize_4bit`` in the tests and falls back to it off the CPU.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any


from ..errors import RecipeError
from .config import QAT_METHODS, QATConfig  # noqa: F401 - QATConfig's home before config.py

if TYPE_CHECKING:
    import torch

    from ..context import RunContext
    from .config import LoraSettings

ADAPTER = "default"


# ---------------------------------------------------------------------------------------------------------------------
# The quantizer the merge uses


def cast_like_merge(w: "torch.Tensor", storage_dtype: "torch.dtype | None", load_dtype: "torch.dtype"):
    """``w`` as the requantize merge hands it to the quantizer: saved in the storage dtype, reloaded in the run's."""
    if storage_dtype is not None:
        w = w.to(storage_dtype)
    return w.to(load_dtype)


def quantize_4bit(w: "torch.Tensor", blocksize: int, quant_type: str, compress_statistics: bool,
                  quant_storage: "torch.dtype") -> tuple["torch.Tensor", Any]:
    """``bitsandbytes.functional.quantize_4bit`` (packed codes, QuantState), bit for bit, faster on CPU."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    if w.device.type != "cpu" or w.numel() % blocksize or w.dtype not in _FLOATS():
        return bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress_statistics,
                                            quant_type=quant_type, quant_storage=quant_storage)
    packed, absmax = _codes_cpu(w, blocksize, quant_type, quant_storage)
    code = get_4bit_type(quant_type, device=w.device)
    if not compress_statistics:  # the rest as bitsandbytes.functional.quantize_4bit does it
        return packed, QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code,
                                  quant_type=quant_type)
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    return packed, QuantState(absmax=qabsmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code,
                              quant_type=quant_type, offset=offset, state2=state2)


def _FLOATS() -> tuple:
    import torch

    return (torch.float32, torch.bfloat16, torch.float16)


def _codes_cpu(w: "torch.Tensor", blocksize: int, quant_type: str, quant_storage: "torch.dtype"):
    """bitsandbytes' default ``quantize_4bit`` kernel (the one CPUs run) for ``numel % blocksize == 0``, with
    ``torch.bucketize`` replaced by counting the bounds below each value (the same index, exactly)."""
    import torch
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds(quant_type, w.device)
    blocks = w.numel() // blocksize
    a = w.reshape(-1).float().reshape(blocks, blocksize)
    absmax = a.abs().max(dim=-1)[0]  # (blocks,)
    scaled = torch.clamp(a * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    q = bucket_index(scaled, bounds)
    if quant_type != "nf4":
        q = order.to(torch.uint8)[q.long()]
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def bucket_index(scaled: "torch.Tensor", bounds: "torch.Tensor") -> "torch.Tensor":
    """``torch.bucketize(scaled, bounds)`` as uint8, exactly: how many of the (15) bounds lie below each value,
    counted without bucketize's slow search (4x on CPU)."""
    import torch

    first, *rest = bounds.tolist()  # float32 values, exactly (python floats compare as float32 tensors' do)
    q = (scaled > first).to(torch.uint8)
    for b in rest:
        q += scaled > b
    return q


def requantized(w: "torch.Tensor", like: Any) -> Any:
    """A ``Params4bit`` of ``w`` (in the load dtype) quantized as bitsandbytes quantizes ``like`` on load."""
    import bitsandbytes as bnb

    state = like.quant_state
    storage = getattr(state, "original_storage_type", None) or like.quant_storage
    nested = bool(getattr(state, "original_nested", state.nested))
    packed, new_state = quantize_4bit(w.contiguous(), state.blocksize, state.quant_type, nested, storage)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
                             compress_statistics=nested, quant_type=state.quant_type, quant_storage=storage,
                             bnb_quantized=True)


def unpack_for_cpu_(module: Any) -> None:
    """Undo bnb's AVX512-BF16 repacking of a ``Linear4bit`` weight (done in place on its first inference forward)."""
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


def dequantize_fp32(module: Any) -> "torch.Tensor":
    """``deq(Q0)`` (out, in) in float32, as the merge computes it (it loads the base in float32)."""
    import bitsandbytes as bnb
    import torch

    unpack_for_cpu_(module)
    state = copy.copy(module.weight.quant_state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(module.weight.data, state).float()


def is_bnb_4bit(module: Any) -> bool:
    """A bnb 4-bit layer itself: its own ``weight`` parameter is a ``Params4bit`` (a peft LoRA layer around one
    reaches the same weight through a property, and is not one)."""
    return type(getattr(module, "_parameters", {}).get("weight")).__name__ == "Params4bit"


# ---------------------------------------------------------------------------------------------------------------------
# Fake-quantized LoRA layers


@dataclass
class _Fake:
    """One adapted layer in QAT mode."""

    layer: Any  # peft LoraLayer; its base layer is a bnb Linear4bit (or a dense Linear the quantize stage skipped)
    source: Any  # (out, in) fp32: S, the weight the merge adds the adapter to
    shadow: Any = None  # bnb: a copy of the base layer holding Q(W); dense: W as the merge stores it
    key: tuple | None = None  # what the shadow was made from (versions of A and B, mode)


@dataclass
class QAT:
    """What ``qat_`` installed; ``seconds``: time spent making fake-quantized weights."""

    fakes: list[_Fake]
    storage_dtype: Any
    load_dtype: Any
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def merged_weight(self, fake: _Fake) -> "torch.Tensor":
        """``W = S + s·B@A`` (out, in) fp32, with the same operations in the same order as the merge."""
        import torch

        layer = fake.layer
        with torch.no_grad():
            a = self._stored(layer.lora_A[ADAPTER].weight)  # (r, in)
            b = self._stored(layer.lora_B[ADAPTER].weight)  # (out, r)
            return fake.source + (b @ a) * layer.scaling[ADAPTER]  # merge.lora_delta, then merged_dense's sum

    def _stored(self, p: "torch.Tensor") -> "torch.Tensor":
        """The adapter tensor as ``save_adapter`` stores it (the storage dtype), in float32."""
        t = p.detach()
        return (t.to(self.storage_dtype) if self.storage_dtype is not None else t).float()

    def refresh(self, fake: _Fake) -> Any:
        """The fake-quantized weight for the current A and B; made again only after they changed."""
        import torch

        layer = fake.layer
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        # One per mode too: an eval forward packs a bnb weight for the CPU inference kernel (no backward), and a
        # weight made under inference mode cannot take part in training.
        key = (a.data_ptr(), a._version, b.data_ptr(), b._version, layer.training, torch.is_inference_mode_enabled())
        if key != fake.key or fake.shadow is None:
            t = time.perf_counter()
            w = cast_like_merge(self.merged_weight(fake), self.storage_dtype, self.load_dtype)
            base = layer.get_base_layer()
            fake.shadow = _shadow(base, requantized(w, base.weight)) if is_bnb_4bit(base) else w
            fake.key = key
            self.seconds += time.perf_counter() - t
        return fake.shadow

    def codes_changed(self) -> float | None:
        """Share of the adapted layers' 4-bit codes that differ from the quantize stage's (Q(W) vs Q0)."""
        import torch

        changed = total = 0
        for fake in self.fakes:
            base = fake.layer.get_base_layer()
            if not is_bnb_4bit(base):
                continue
            with torch.inference_mode(False), torch.no_grad():
                layer_training = fake.layer.training
                fake.layer.training = True  # the unpacked layout, comparable with the base's
                shadow = self.refresh(fake)
                fake.layer.training = layer_training
            new, old = _nibbles(shadow.weight), _nibbles(base.weight)
            changed += int((new != old).sum())
            total += new.numel()
        return changed / total if total else None

    def remove(self) -> None:
        """Back to plain LoRA layers (the 4-bit layers without an adapter stay requantized)."""
        for fake in self.fakes:
            fake.layer.__dict__.pop("forward", None)
            fake.shadow = None


def _nibbles(weight: Any) -> "torch.Tensor":
    import torch

    packed = weight.data.view(torch.uint8).reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)


def _shadow(base: Any, weight: Any) -> Any:
    """A shallow copy of the bnb layer ``base`` computing with ``weight``: the class, flags and compute dtype of the
    layer the merged model loads, so its forward takes the same bnb path (kernel, CPU packing, casts)."""
    shadow = copy.copy(base)
    shadow.__dict__["_parameters"] = {**base._parameters, "weight": weight}
    shadow.__dict__["_forward_hooks"] = {}
    shadow.__dict__["_forward_pre_hooks"] = {}
    weight.module = shadow
    shadow.quant_state = weight.quant_state
    return shadow


def _fake_forward(qat: QAT, fake: _Fake):
    def forward(x: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        layer = fake.layer
        base = layer.get_base_layer()
        shadow = qat.refresh(fake)
        if is_bnb_4bit(base):
            shadow.training = base.training
            y = shadow(x)
        else:  # a dense layer the quantize stage skipped: the merge stores W in the storage dtype
            y = F.linear(x, shadow.to(x.dtype), base.bias)
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        if not (torch.is_grad_enabled() and a.weight.requires_grad):
            return y
        z = b(a(x.detach().to(a.weight.dtype))) * layer.scaling[ADAPTER]  # (..., out)
        return y + (z - z.detach()).to(y.dtype)

    return forward


def qat_(peft_model: Any, sources: dict[str, "torch.Tensor"], storage_dtype: str | None, load_dtype: str) -> QAT:
    """Put every LoRA layer of ``peft_model`` in QAT mode, in place, and requantize its 4-bit layers without an
    adapter. ``sources``: ``{layer name: S}`` for every adapted and every 4-bit layer; ``storage_dtype``: the dtype
    the merge saves dense weights and the adapter in; ``load_dtype``: the dtype the merge reloads them in."""
    import torch

    from ..models.loading import torch_dtype
    from .layers import lora_layers

    qat = QAT(fakes=[], storage_dtype=torch_dtype(storage_dtype) if storage_dtype else None,
              load_dtype=torch_dtype(load_dtype))
    adapted = lora_layers(peft_model)
    for name, layer in adapted:
        base = layer.get_base_layer()
        if not (is_bnb_4bit(base) or type(base) is torch.nn.Linear):
            raise RecipeError(f"`qat` fake-quantizes bitsandbytes 4-bit layers, and `{name}` is a "
                              f"`{type(base).__name__}`. Fix: quantize with bnb-nf4 or bnb-fp4, or remove `qat`")
        if type(layer.lora_dropout[ADAPTER]) is not torch.nn.Identity:
            raise RecipeError("`qat` trains the merged weight, which has no dropout. Fix: set `dropout: 0`")
        fake = _Fake(layer=layer, source=sources[name])
        layer.__dict__["forward"] = _fake_forward(qat, fake)  # an instance attribute: nn.Module calls it
        qat.fakes.append(fake)
    adapted_bases = {id(layer.get_base_layer()) for _, layer in adapted}
    for name, module in peft_model.get_base_model().named_modules():
        if is_bnb_4bit(module) and id(module) not in adapted_bases:
            w = cast_like_merge(sources[name], qat.storage_dtype, qat.load_dtype)
            new = requantized(w, module.weight)
            new.module = module
            module._parameters["weight"] = new
            module.quant_state = new.quant_state
    return qat


def merge_sources(peft_model: Any, requantize_from: str, source_dir: Any) -> dict[str, "torch.Tensor"]:
    """``{layer name: S}`` (fp32) for the adapted and the 4-bit layers: what ``merged_dense`` adds the adapter to."""
    from ..models.loading import load_model
    from .layers import lora_layers

    base = peft_model.get_base_model()
    layers = {n: m.get_base_layer() for n, m in lora_layers(peft_model)}
    adapted = {id(m) for m in layers.values()}  # their bases are also modules of the model (`<name>.base_layer`)
    layers.update({n: m for n, m in base.named_modules() if is_bnb_4bit(m) and id(m) not in adapted})
    out = {}
    if requantize_from == "dequantized":
        out = {n: dequantize_fp32(m) for n, m in layers.items() if is_bnb_4bit(m)}
    rest = [n for n in layers if n not in out]  # merged_dense takes these from the weights quantize started from
    if rest:
        dense = load_model(source_dir, "cpu", "float32")[0]
        out.update({n: dense.get_submodule(n).weight.detach().float() for n in rest})
        del dense
    return out


def enable_qat(model: Any, cfg: "LoraSettings", ctx: "RunContext", source: Any = None) -> QAT:
    """QAT mode for the peft model the lora stage trains (after its init), against the merge ``cfg`` asks for;
    ``source``: the dense weights the merge starts from, when not the quantize stage's (a re-fitted base)."""
    from ..models.loading import storage_dtype_of
    from .merge import quantize_source

    check_qat_base(model, f"stages[{ctx.stage_index}] (lora)")
    sources = merge_sources(model, cfg.requantize_from, source or quantize_source(ctx)[1])
    qat = qat_(model, sources, storage_dtype_of(ctx.original.path), ctx.runtime.dtype)
    qat.info = {"requantize_from": cfg.requantize_from, "layers": len(qat.fakes)}
    return qat


def check_qat_base(model: Any, where: str) -> None:
    """Refuse a model with no bnb 4-bit layer (dense, GGUF, other methods) before any training."""
    if not any(is_bnb_4bit(m) for m in model.modules()):
        raise RecipeError(f"{where}: `qat: true` fake-quantizes with bitsandbytes' 4-bit quantizer, and the model "
                          "here has no bnb 4-bit layer. Fix: put `{type: quantize, method: bnb-nf4}` (or bnb-fp4) "
                          "right before the lora stage, or remove `qat`")
