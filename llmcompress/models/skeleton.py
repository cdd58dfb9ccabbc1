"""Load a folder into a skeleton built from its config.json (any family: LLM, vision, VLM): layers swapped for the
ones a saved layout holds, shapes resized to what structured pruning left, then the weights.

- ``load_swapped``: the architecture, a ``swap`` callback that puts the special layers in place (and takes their
  tensors out of the state dict), then the rest of the weights. Used by dynamic int8, the rtn layout of vision
  models (Linear + Conv2d) and structured (resized) folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def set_module(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def read_state(path: Path) -> dict:
    from safetensors.torch import load_file

    state: dict = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def load_swapped(path: str | Path, device: str, dtype: str, swap: Callable[[Any, dict, Any], dict | None]):
    """The architecture of ``path``, ``swap(model, state, torch_dtype)`` in place, then every remaining weight.

    ``swap`` replaces modules and pops the state-dict entries it consumed; it may return ``{name: module}`` to put
    in place after the weights load (modules whose own loading cannot read a safetensors state). Raises when a weight
    is missing.
    """
    import torch
    from transformers import AutoConfig

    from ..utils.tensorfile import no_init
    from .family import auto_model_class
    from .loading import read_meta, to_model_keys, torch_dtype

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    dt = torch_dtype(dtype)
    with no_init():
        model = auto_model_class(config).from_config(config, dtype=dt)
    state = to_model_keys(model, read_state(path))
    resize_structured_(model, read_meta(path), state, dt)
    later = swap(model, state, dt) or {}
    state = {k: v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")} if getattr(
        config, "tie_word_embeddings", False) else set()
    if tied:
        model.tie_weights()
    missing = [k for k in result.missing_keys if k not in tied and k.rpartition(".")[0] not in later]
    if missing:
        raise RuntimeError(f"{path}: weights missing from the checkpoint: {missing[:5]}")
    for name, module in later.items():
        set_module(model, name, module)
    return model.to(device).eval()


def resize_structured_(model: Any, meta: dict, state: dict, dtype: Any) -> None:
    """Give a skeleton the shapes structured pruning left: the Linear, Conv2d and (frozen) BatchNorm layers
    llmcompress.json lists (whatever layout later replaces them with), then every other parameter whose saved shape
    differs (ConvNeXt V2's GRN)."""
    import torch

    for name, spec in ((meta.get("structured") or {}).get("modules") or {}).items():
        old = model.get_submodule(name)
        if isinstance(spec, dict):  # conv pruning (vision/prune_conv.py): {"conv2d": [out, in, groups]} or BN
            set_module(model, name, _resized_conv_or_norm(old, spec, dtype))
            continue
        out_f, in_f = spec
        set_module(model, name, torch.nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=dtype))
    resize_to_state_(model, state)


def _resized_conv_or_norm(old: Any, spec: dict, dtype: Any):
    """A Conv2d (``{"conv2d": [out, in, groups]}``), BatchNorm2d (``{"batchnorm2d": n}``) or frozen BatchNorm
    (``{"frozen_norm": n}``) like ``old`` at the saved width."""
    import torch

    if "conv2d" in spec:
        out_c, in_c, groups = spec["conv2d"]
        return torch.nn.Conv2d(in_c, out_c, old.kernel_size, stride=old.stride, padding=old.padding,
                               dilation=old.dilation, groups=groups, bias=old.bias is not None,
                               padding_mode=old.padding_mode, dtype=dtype)
    if "frozen_norm" in spec:  # transformers' FrozenBatchNorm2d(n) (DETR, RT-DETR backbones): buffers only
        return type(old)(spec["frozen_norm"]).to(dtype)
    return torch.nn.BatchNorm2d(spec["batchnorm2d"], eps=old.eps, momentum=old.momentum, affine=old.affine,
                                track_running_stats=old.track_running_stats, dtype=dtype)


def resize_to_state_(model: Any, state: dict) -> list[str]:
    """Give every parameter whose saved shape differs the saved shape (structured pruning shrank it); Linear layers
    get matching ``in_features``/``out_features``. Returns the names resized."""
    import torch

    resized = []
    for name, param in list(model.named_parameters()):
        saved = state.get(name)
        if saved is None or saved.shape == param.shape:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(torch.empty(saved.shape, dtype=param.dtype), requires_grad=False))
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            module.out_features, module.in_features = saved.shape
        resized.append(name)
    return resized


def load_structured(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """FORMATS["structured"]: the architecture, every layer at its saved (structured-pruned) shape, the weights."""
    return load_swapped(path, device, dtype, lambda model, state, dt: None)
