"""torchao quantization: int8 weight-only, int8 dynamic activation + int8 weight, and int4 weight-only.

    - {type: quantize, method: torchao-int8wo}
    - {type: quantize, method: torchao-int8dq}
    - {type: quantize, method: torchao-int4wo, group_size: 64}

Each runs torchao's ``quantize_(model, config, filter_fn=...)`` on a copy of the current model; ``skip`` names the
linear layers left out. How each is saved:

- int8 (both variants), and int4 on CUDA (``Int4WeightOnlyConfig``, tinygemm ``tile_packed_to_4d`` layout): through
  transformers' own torchao serialization (``TorchAoConfig`` in config.json, tensor subclasses flattened into
  safetensors), so a plain ``AutoModelForCausalLM.from_pretrained(folder)`` reloads them, as vLLM does.
- int4 on CPU: torchao 0.18 runs int4 on CPU only through the prototype ``PrototypeInt4WeightOnlyConfig``
  (``Int4OpaqueTensor``), and upstream cannot save it: ``Int4OpaqueTensor`` is missing from torchao's safetensors
  allow-list (``save_pretrained`` raises ``ValueError: Unsupported tensor type``) and its config module from
  ``ALLOWED_AO_MODULES`` (so a patched file would not reload either). Patching both allow-lists round-trips on one
  machine, but the packed bytes are ISA-specific: PyTorch's ``_convert_weight_to_int4pack_for_cpu`` interleaves
  64 output rows on AVX-512, 32 on AVX2 and none on other CPUs, so a file from one CPU would silently decode to wrong
  weights on another. Keeping bf16 on disk and quantizing at load would be portable but save nothing on disk.
  So the int4 values are stored in a plain, portable layout: ``<layer>.weight_int4`` (uint8 ``(out, in // 2)``, two
  values per byte, low nibble first) plus torchao's ``<layer>.weight_scale_and_zero``. ``load_torchao`` packs them
  for the loading CPU's kernel. This layout is ours (``llmcompress.json``: ``format: torchao, layout: int4-plain``):
  ``llmcompress.models.loading.load_model`` reloads it, ``from_pretrained`` alone cannot.

On CPU there are no torchao C++ kernels in the PyPI wheel (the "Failed to load ..._C_*.so" lines at import are
harmless): int8 runs through torch's int8 matmuls, int4 through PyTorch's own tinygemm CPU kernel. That kernel is
vectorized for bf16 activations only (fp32 falls back to scalar code, 16-76x slower than a dense fp32 layer here), so
int4 layers always compute in bf16; in a model that runs in fp32 (``dtype: auto`` on CPUs without native bf16) they
cast their input to bf16 and their output back.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ..errors import LLMCompressError, RecipeError, require
from .base import QuantizeConfig

if TYPE_CHECKING:
    from ..context import RunContext

HF_LAYOUT = "hf"  # transformers' torchao serialization: from_pretrained reloads it
INT4_PLAIN = "int4-plain"  # our portable CPU int4 layout (see the module docstring)


class _TorchaoConfig(QuantizeConfig):
    """Shared by the torchao variants: checks, ``quantize_`` on a copy, and the save layout."""

    #: Dtype the quantized layers compute in, whatever the model runs in (None: the model's dtype).
    kernel_dtype: ClassVar[str | None] = None

    def preflight(self, base_dir: "Path | None" = None) -> None:
        require("torchao", "torchao", f"Method `{self.method}`")

    def ao_config(self, device: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def layout(self, device: str) -> str:
        return HF_LAYOUT

    def check_layer(self, name: str, lin: Any, device: str) -> None:
        """Raise RecipeError when ``lin`` cannot be quantized as configured (torchao would skip it silently)."""

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        import time
        from importlib.metadata import version

        import torch

        from ..models.loading import param_bytes, torch_dtype

        t0 = time.perf_counter()
        from torchao.quantization import quantize_  # (~10 s on a busy 2-core box: reported apart)

        import_seconds = time.perf_counter() - t0
        device = torch.device(ctx.runtime.device).type
        model, tokenizer = ctx.working_copy()
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        targets = {n for n, _ in linears if not self.skips(n)}
        skipped = [n for n, _ in linears if n not in targets]
        if not targets:
            raise RecipeError(
                f"{self.method} found no `nn.Linear` layer to quantize "
                f"({len(linears)} linear layers, skip={self.skip}). "
                "Fix: loosen `skip`, or put this stage before any other quantize stage."
            )
        for name, lin in linears:
            if name in targets:
                self.check_layer(name, lin, device)
        ao_config = self.ao_config(device)
        kernel_dtype = self.kernel_dtype or ctx.runtime.dtype
        for name in targets:  # quantize from (and so compute in) the kernel's dtype
            weight = model.get_submodule(name).weight
            weight.data = weight.data.to(torch_dtype(kernel_dtype))
        quantize_(model, ao_config, filter_fn=lambda module, fqn: fqn in targets)
        if "lm_head" in targets and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # lm_head now has its own (quantized) weights
        layout = self.layout(device)
        for name in targets:
            _compute_in_(model.get_submodule(name), kernel_dtype, ctx.runtime.dtype)
            if layout == INT4_PLAIN:
                model.get_submodule(name).register_state_dict_post_hook(_int4_state_dict_hook)
        if layout == HF_LAYOUT:
            _attach_hf_serialization(model, ao_config, skipped)
            on_disk = "torchao tensors in safetensors + TorchAoConfig in config.json (from_pretrained loads it)"
        else:
            on_disk = "plain int4 (2 per byte) + torchao scale_and_zero; packed for this CPU's int4 kernel at load"
        names = sorted(targets)
        meta = {"format": "torchao", "torchao": {
            "variant": self.method, "layout": layout, "device_type": device, "modules": names,
            "group_size": getattr(self, "group_size", None), "ao_config": type(ao_config).__name__,
            "kernel_dtype": kernel_dtype, "torchao_version": version("torchao"),
        }}
        info = {"quantized_modules": len(names), "skipped_modules": skipped, "layout": layout, "on_disk": on_disk,
                "kernel_dtype": kernel_dtype, "param_bytes": param_bytes(model),
                "import_seconds": round(import_seconds, 3), "meta": meta}
        return model, tokenizer, info


class TorchaoInt8WeightOnlyConfig(_TorchaoConfig):
    """int8 weights, one scale per output row; activations stay 16-bit: ``{type: quantize, method: torchao-int8wo}``."""

    method: Literal["torchao-int8wo"] = "torchao-int8wo"
    nominal_bits: ClassVar[float] = 8

    def ao_config(self, device: str) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(set_inductor_config=False)  # True would change global torch._inductor settings


class TorchaoInt8DynamicConfig(_TorchaoConfig):
    """int8 weights per row, int8 activations per token at run time: ``{type: quantize, method: torchao-int8dq}``.

    The int8 x int8 products go through ``torch._int_mm``; on CPUs without VNNI/AMX it is a slow reference kernel
    (measured on an AVX2 EPYC: 55x slower than the fp32 matmul of the same shape), so prefer int8wo there.
    """

    method: Literal["torchao-int8dq"] = "torchao-int8dq"
    nominal_bits: ClassVar[float] = 8

    def ao_config(self, device: str) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


class TorchaoInt4WeightOnlyConfig(_TorchaoConfig):
    """int4 weights per group, asymmetric: ``{type: quantize, method: torchao-int4wo, group_size: 64}``."""

    method: Literal["torchao-int4wo"] = "torchao-int4wo"
    group_size: Literal[32, 64, 128] = Field(
        64, description="Weights sharing one scale and zero; must divide every layer's input width (576 = 9 x 64)."
    )
    nominal_bits: ClassVar[float] = 4
    # tinygemm, on CPU and CUDA alike, is fast for bf16 activations only: on this AVX2 CPU with fp32 activations the
    # CPU kernel fell back to scalar code, 16x (1 token) to 76x (64 tokens) slower than a dense fp32 layer
    kernel_dtype: ClassVar[str | None] = "bfloat16"

    def ao_config(self, device: str) -> Any:
        if device == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=self.group_size, set_inductor_config=False)
        from torchao.quantization import Int4WeightOnlyConfig

        # the default "plain" packing needs the separate `mslk` package; tinygemm's layout ships with torch
        return Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)

    def layout(self, device: str) -> str:
        return INT4_PLAIN if device == "cpu" else HF_LAYOUT

    def check_layer(self, name: str, lin: Any, device: str) -> None:
        if lin.in_features % self.group_size:
            raise RecipeError(
                f"group_size {self.group_size} does not divide the input width {lin.in_features} of `{name}`. "
                f"Fix: use 32, 64 or 128 dividing {lin.in_features} (64 for SmolLM2's 576), or add `{name}` to `skip`."
            )
        if device == "cpu" and lin.out_features % 16:
            raise RecipeError(
                f"the CPU int4 kernel needs an output width divisible by 16, but `{name}` has {lin.out_features}. "
                f"Fix: add `{name}` to `skip`."
            )


def _compute_in_(layer, kernel_dtype: str, model_dtype: str) -> None:
    """Let ``layer`` compute in ``kernel_dtype`` inside a model that runs in ``model_dtype`` (casts around it)."""
    if kernel_dtype == model_dtype:
        return
    from ..models.loading import torch_dtype

    layer.register_forward_pre_hook(functools.partial(_cast_input, dtype=torch_dtype(kernel_dtype)))
    layer.register_forward_hook(functools.partial(_cast_output, dtype=torch_dtype(model_dtype)))


def _cast_input(module, args, *, dtype):
    return (args[0].to(dtype), *args[1:])


def _cast_output(module, args, output, *, dtype):
    return output.to(dtype)


def _attach_hf_serialization(model, ao_config, skipped: list[str]) -> None:
    """Give ``model`` what ``from_pretrained(..., quantization_config=TorchAoConfig(...))`` would have given it, so
    ``save_pretrained`` flattens the torchao tensors into safetensors and writes the config that reloads them."""
    import re

    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    qc = TorchAoConfig(quant_type=ao_config, modules_to_not_convert=[re.escape(n) for n in skipped] or None)
    model.config.quantization_config = qc
    model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)


# ---- portable CPU int4 -------------------------------------------------------------------------------------------


def _pack_cpu(values):
    """(N, K) ints in [0, 16) -> PyTorch's CPU int4 layout (N, K // 2) uint8, as Int4OpaqueTensor holds it."""
    import torch

    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32).contiguous(), 1)


def _nibbles(b):
    """uint8 tensor -> flat int32 values, low nibble of each byte first."""
    import torch

    return torch.stack([b & 15, b >> 4], -1).reshape(-1).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _pack_order(n: int, k: int):
    """For each nibble of ``_pack_cpu``'s output (read low nibble first), the row-major index of the (n, k) input
    value it holds. Found by packing the hex digits of an index matrix, so it is exact for whichever ISA-specific
    layout this process's kernel uses (a pure permutation of nibbles on every CPU path)."""
    import torch

    index = torch.arange(n * k, dtype=torch.int32).reshape(n, k)
    order = torch.zeros(n * k, dtype=torch.int32)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        order |= _nibbles(_pack_cpu((index >> shift) & 15)) << shift
    return order


def plain_from_packed(qdata, n: int, k: int):
    """Int4OpaqueTensor ``qdata`` -> uint8 (n, k // 2): row-major int4 values, two per byte, low nibble first."""
    import torch

    values = torch.empty(n * k, dtype=torch.int32)
    values[_pack_order(n, k).long()] = _nibbles(qdata.contiguous())
    values = values.reshape(n, k)
    return (values[:, 0::2] | (values[:, 1::2] << 4)).to(torch.uint8)


def packed_from_plain(plain, n: int, k: int):
    """Inverse of ``plain_from_packed``, for this CPU's kernel."""
    return _pack_cpu(_nibbles(plain).reshape(n, k))


def _int4_state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """Write an Int4OpaqueTensor weight as portable plain int4 + scale_and_zero (see the module docstring)."""
    import torch

    w = state_dict.pop(prefix + "weight")
    n, k = w.shape
    if getattr(w, "act_pre_scale", None) is not None or getattr(w, "act_mapping_type", None) is not None:
        raise NotImplementedError(f"`{prefix}weight`: only plain int4 weight-only tensors can be saved")
    plain = plain_from_packed(w.qdata, n, k)
    if not torch.equal(packed_from_plain(plain, n, k), w.qdata):  # the unpacking must be exact, or nothing is saved
        raise RuntimeError(f"`{prefix}weight`: the CPU int4 layout did not round-trip; torch's packing has changed")
    state_dict[prefix + "weight_int4"] = plain
    state_dict[prefix + "weight_scale_and_zero"] = w.scale_and_zero


# ---- loading -----------------------------------------------------------------------------------------------------


def load_torchao(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """Load a torchao folder: through transformers, or (CPU int4) by packing the plain int4 for this CPU."""
    import torch

    from ..models.loading import read_meta, torch_dtype
    from ..models.family import auto_model_class

    path = Path(path)
    info = read_meta(path)["torchao"]
    if info["variant"] == "torchao-int4wo" and torch.device(device).type != info["device_type"]:
        raise LLMCompressError(
            f"{path} holds torchao int4 weights in the {info['device_type']} kernel's layout, which does not run on "
            f"`{device}`. Fix: load it with device {info['device_type']}, or quantize again on {device}."
        )
    if info["layout"] == INT4_PLAIN:
        model = _load_int4_plain(path, info, dtype)
    else:
        model = auto_model_class(path).from_pretrained(str(path), dtype=torch_dtype(dtype), device_map=device,
                                                       **kwargs)
    for name in info["modules"]:
        _compute_in_(model.get_submodule(name), info.get("kernel_dtype") or dtype, dtype)
    return model.eval()


def _load_int4_plain(path: Path, info: dict, dtype_name: str):
    import torch
    from safetensors import safe_open

    from ..models.loading import torch_dtype
    from .hqq import empty_model  # (shared skeleton helper; no hqq import)

    dtype, kernel_dtype = torch_dtype(dtype_name), torch_dtype(info.get("kernel_dtype") or dtype_name)
    model = empty_model(path, dtype)
    quantized = {f"{name}.weight_int4": name for name in info["modules"]}
    state: dict[str, torch.Tensor] = {}
    found = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as file:  # tensor by tensor: the plain int4 is freed as soon as it is packed
            for key in file.keys():
                if key in quantized:
                    lin = model.get_submodule(quantized[key])
                    scale_and_zero = file.get_tensor(quantized[key] + ".weight_scale_and_zero")
                    lin.weight = _int4_parameter(file.get_tensor(key), scale_and_zero, lin.out_features,
                                                 lin.in_features, info["group_size"], kernel_dtype)
                    lin.register_state_dict_post_hook(_int4_state_dict_hook)  # so it saves again in the same layout
                    found.add(key)
                    _release_freed_memory()
                elif not key.endswith(".weight_scale_and_zero"):
                    v = file.get_tensor(key)
                    state[key] = v.to(dtype) if v.is_floating_point() else v
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    done = {f"{name}.weight" for name in info["modules"]} | ({"lm_head.weight"} if tied else set())
    missing = sorted(set(quantized) - found) + [k for k in result.missing_keys if k not in done]
    if missing:
        raise RuntimeError(f"{path}: weights missing from the torchao int4 checkpoint: {missing[:5]}")
    return model.eval()


def _int4_parameter(plain, scale_and_zero, n: int, k: int, group_size: int, dtype):
    import torch
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    weight = Int4OpaqueTensor(packed_from_plain(plain, n, k), scale_and_zero.to(dtype), block_size=[1, group_size],
                              shape=torch.Size([n, k]))
    return torch.nn.Parameter(weight, requires_grad=False)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Packing needs int32 temporaries 8x the size of the int4 weight; glibc keeps freed blocks of that size in its
    heap, between the packed weights that stay, so without this the load's peak RSS on SmolLM2 was ~3x the model's
    bytes (measured: 359 MB retained for 111 MB of tensors; 116 MB peak with it).
    """
    from ..utils.memory import trim

    trim()
