"""The quantize stage on a vision model: the LLM methods' code on the vision model, with vision defaults.

- ``skip`` (when the recipe does not set it) defaults to the task head: the classifier of an image classifier, the
  class and box heads of a detector (a 10-way classifier is a few KiB and the most sensitive layer).
- rtn also quantizes Conv2d layers (``RTNConv2d``: the flattened filter in groups of ``group_size`` where that
  divides it, else one scale per filter; depthwise convs included); every other method covers ``nn.Linear`` only
  (``checks.VISION_QUANT_LAYERS``).
- The result adds ``layers``: what was quantized and what stayed dense, by layer type, with the share of weights.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..quant.base import QuantizeConfig
from ..quant.rtn import RTNConfig

if TYPE_CHECKING:
    from pathlib import Path

    from ..context import RunContext
    from ..stage import StageResult

#: Task heads left dense by default (regexes over full module names).
HEAD_SKIP = {
    "image-classification": [r"(.*\.)?classifier(\..*)?$", r"(.*\.)?head(\.fc)?$", r"(.*\.)?fc$"],
    "object-detection": [r"(.*\.)?class_labels_classifier(\..*)?$", r"(.*\.)?bbox_predictor(\..*)?$",
                         r"(.*\.)?class_embed(\..*)?$", r"(.*\.)?bbox_embed(\..*)?$"],
}
#: Layer types that hold quantized weights, by class name (bnb, hqq, torchao subclasses, rtn, dynamic int8).
QUANTIZED_TYPES = ("Linear4bit", "Linear8bitLt", "HQQLinear", "RTNLinear", "RTNConv2d", "DynamicQuantizedLinear")


def default_skip(task: str | None) -> list[str]:
    return list(HEAD_SKIP.get(task or "image-classification", []))


def run_quantize(stage: Any, ctx: "RunContext") -> "StageResult":
    from ..stage import generic_run
    from .checks import VISION_QUANT_LAYERS

    if stage.method not in VISION_QUANT_LAYERS:  # the recipe check stops this earlier; kept for Python callers
        raise RecipeError(f"`{stage.method}` does not apply to vision models. Fix: use one of "
                          f"{', '.join(VISION_QUANT_LAYERS)}.")
    task = ctx.model_task
    if "skip" not in stage.model_fields_set:
        stage = stage.model_copy(update={"skip": default_skip(task)})
    if stage.method == "rtn":
        stage = VisionRTN.of(stage)
    structure = ctx.current.meta.get("structured")  # a structured-pruned source: later loads need its shapes
    t = time.perf_counter()
    if not stage.method.startswith("bnb-"):  # (bnb loads its own copy, quantizing while it loads)
        ctx.current.load()  # loaded (and transformers' imports paid) before the method's clock starts
    load_seconds = time.perf_counter() - t
    result = generic_run(stage, ctx)
    if structure:
        carry_meta_(ctx.current, {"structured": structure, "kind": "vision"})
    model = ctx.current.load()[0]
    result.data["layers"] = layer_report(model, stage)
    result.data["covers"] = VISION_QUANT_LAYERS[stage.method]
    result.data["source_load_seconds"] = round(load_seconds, 3)
    result.data["applied_config"] = stage.model_dump(mode="json", exclude_none=True)
    result.summary["quantized"] = _layers_line(result.data["layers"])
    return result


def carry_meta_(handle: Any, extra: dict) -> None:
    """Add ``extra`` to a saved folder's llmcompress.json (and to the handle's copy of it)."""
    from ..models.loading import META
    from ..utils.io import atomic_write_json, read_json

    meta = {**read_json(handle.path / META), **extra}
    atomic_write_json(handle.path / META, meta)
    handle.meta = meta


def layer_report(model: Any, stage: Any) -> dict:
    """Layers by type: quantized (by their quantized class) and dense (Linear / Conv2d left as they were), with the
    share of the model's weight elements each holds."""
    import torch

    quantized: dict[str, int] = {}
    dense: dict[str, int] = {}
    q_weights = d_weights = 0
    inner = {id(m.q) for m in model.modules() if type(m).__name__ == "RTNConv2d"}  # counted with their conv
    for m in model.modules():
        if id(m) in inner:
            continue
        kind = _type_name(m)
        n = _weight_numel(m)
        if kind in QUANTIZED_TYPES or _torchao_weight(m):
            label = kind if kind in QUANTIZED_TYPES else f"{kind} (torchao {type(m.weight).__name__})"
            quantized[label] = quantized.get(label, 0) + 1
            q_weights += n
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            dense[kind] = dense.get(kind, 0) + 1
            d_weights += n
    total = q_weights + d_weights
    return {"quantized": quantized, "dense": dense, "quantized_weight_share": q_weights / total if total else 0.0,
            "quantized_weights": q_weights, "dense_weights": d_weights, "skip": list(stage.skip)}


def _type_name(m: Any) -> str:
    import torch

    return "DynamicQuantizedLinear" if isinstance(m, torch.ao.nn.quantized.dynamic.Linear) else type(m).__name__


def _weight_numel(m: Any) -> int:
    """Weights a layer stands for (its logical (out, in) or filter size, however it packs them)."""
    if type(m).__name__ == "RTNConv2d":
        return m.q.in_features * m.q.out_features
    if _type_name(m) == "DynamicQuantizedLinear":
        return m.in_features * m.out_features
    if hasattr(m, "in_features") and hasattr(m, "out_features") and not list(m.children()):
        return int(m.in_features * m.out_features)
    w = getattr(m, "weight", None)
    return int(w.numel()) if w is not None and hasattr(w, "numel") and not list(m.children()) else 0


def _torchao_weight(m: Any) -> bool:
    import torch

    w = getattr(m, "weight", None)
    return isinstance(m, torch.nn.Linear) and w is not None and type(w.data) not in (torch.Tensor,) and \
        hasattr(w, "tensor_data_names")


def _layers_line(layers: dict) -> str:
    q = ", ".join(f"{n} {k}" for k, n in layers["quantized"].items()) or "none"
    return f"{q}; {layers['quantized_weight_share']:.0%} of Linear/Conv weights"


class VisionRTN(RTNConfig):
    """rtn on a vision model: Linear layers as for an LLM, then every Conv2d not skipped."""

    @classmethod
    def of(cls, stage: RTNConfig) -> "VisionRTN":
        return cls.model_validate(stage.model_dump())

    def quantize(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        model, processor, info = super().quantize(ctx)
        convs = quantize_conv_rtn_(model, self)
        info["meta"]["rtn"]["conv_modules"] = convs
        info["meta"].update(kind="vision")
        info["quantized_modules"] += len(convs)
        info["conv_modules"] = len(convs)
        return model, processor, info

    def save_pretrained(self, ctx: "RunContext", model: Any, tokenizer: Any, path: "Path", meta: dict) -> tuple:
        """llmcompress's own rtn layout (compressed-tensors has no scheme for Conv2d layers); plain
        ``from_pretrained`` refuses it (models.loading.mark_own_layout)."""
        return QuantizeConfig.save_pretrained(self, ctx, model, tokenizer, path, meta)


def quantize_conv_rtn_(model: Any, cfg: Any) -> dict[str, int]:
    """Replace every Conv2d not skipped by an RTNConv2d, in place; returns ``{name: group size used}``."""
    import torch

    from ..models.skeleton import set_module
    from .layers import conv_group_size, rtn_conv_class

    rtn_conv = rtn_conv_class()
    done = {}
    for name, conv in [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Conv2d]:
        if cfg.skips(name) or conv.padding_mode != "zeros":
            continue
        gs = conv_group_size(conv, cfg.group_size)
        set_module(model, name, rtn_conv.from_conv(conv, cfg.bits, gs, cfg.symmetric))
        done[name] = gs
    return done
