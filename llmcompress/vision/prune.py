"""The prune stage on vision models: magnitude (unstructured or N:M) over Linear and Conv2d weights, and
``structured``, which removes whole MLP channels (or, on ResNet / MobileNetV2 / RT-DETR, whole conv channels: see
``prune_conv.py``) so the model really gets smaller and faster.

    - {type: prune, method: magnitude, sparsity: 0.5}
    - {type: prune, method: structured, sparsity: 0.5, multiple_of: 64}

magnitude: each layer's smallest |w| go (a conv filter is flattened to (out, in/groups * kh * kw)); N:M groups run
along that flattened input. Layers whose width M does not divide are left dense and listed. The zeros are stored
dense, as for LLMs. The task head (classifier, box heads) stays dense unless ``skip`` says otherwise.

structured: in every MLP block (ConvNeXt ``pwconv1 -> pwconv2``, ViT/DeiT/YOLOS ``intermediate.dense ->
output.dense``, DINOv2 ``mlp.fc1 -> mlp.fc2``) the hidden channels with the smallest ``||W_up[c, :]|| *
||W_down[:, c]||`` are removed: rows of the first layer, columns of the second (and ConvNeXt V2's GRN entries). The
kept count is rounded to ``multiple_of`` (so int4 / hqq group sizes still divide the widths). The weights shrink on
disk and in memory and the MLPs run fewer FLOPs. The folder is ``format: structured``: config.json is the original
architecture and the loader gives each layer its saved shape (``load_structured``); plain ``from_pretrained``
cannot load it, so bnb and torchao (which load through it) cannot follow; rtn, hqq and dynamic-int8 can.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ..data.images import DIGITS, DIGITS_DETECT, ImageDataConfig
from ..errors import RecipeError
from ..prune.base import PruneConfig

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageResult

FORMAT = "structured"
#: model_type -> (up layer suffix, down layer suffix, per-channel module between them or None).
MLP_PAIRS = {
    "convnext": ("pwconv1", "pwconv2", None),
    "convnextv2": ("pwconv1", "pwconv2", "grn"),
    "vit": ("intermediate.dense", "output.dense", None),
    "deit": ("intermediate.dense", "output.dense", None),
    "yolos": ("intermediate.dense", "output.dense", None),
    "vit_msn": ("intermediate.dense", "output.dense", None),
    "dinov2": ("mlp.fc1", "mlp.fc2", None),
}


class StructuredConfig(PruneConfig):
    """Remove MLP hidden channels of a vision model: ``{type: prune, method: structured, sparsity: 0.5}``."""

    method: Literal["structured"] = "structured"
    multiple_of: int = Field(64, ge=1, description="Round each block's kept channels to a multiple of this "
                             "(conv models: 8 unless set).")
    skip: list[str] = Field(default_factory=list, description="MLP layers left whole: names or regexes.")
    bn_calibration: ImageDataConfig | None = Field(
        default_factory=lambda: ImageDataConfig(source=DIGITS, split="train", samples=256),
        description="Conv models: images whose forward passes re-estimate every BatchNorm's running statistics "
        "after pruning (the removed channels change what each BatchNorm sees; a detector's default is "
        "builtin:digits-detect); null = keep the old statistics.")

    @model_validator(mode="after")
    def _no_pattern(self) -> "StructuredConfig":
        if self.pattern is not None:
            raise ValueError('`pattern` is N:M sparsity within rows; `structured` removes whole channels. Fix: use '
                             '`sparsity: 0.5` here, or `method: magnitude` with `pattern: "2:4"`')
        return self


def run_prune(stage: Any, ctx: "RunContext") -> "StageResult":
    """The prune stage's run on a vision model (magnitude or structured)."""
    from ..models.loading import save_model, storage_dtype_of
    from ..prune.base import check_dense, load_dense_copy
    from ..stage import StageResult
    from .quant import default_skip

    from .checks import VISION_PRUNE

    if stage.method not in VISION_PRUNE:
        raise RecipeError(f"`{stage.method}` does not apply to vision models. Fix: use `magnitude` or `structured`.")
    task = ctx.model_task
    if stage.method == "magnitude" and "skip" not in stage.model_fields_set:
        stage = stage.model_copy(update={"skip": default_skip(task)})
    check_dense(ctx.current)
    t0 = time.perf_counter()
    with ctx.task(f"prune {stage.describe()}", total=None):
        model, processor = load_dense_copy(ctx)
        before = _weights(model)
        if stage.method == FORMAT:
            info = _prune_structured_any_(model, stage)
            _recalibrate(model, processor, stage, ctx, info)
        else:
            info = prune_magnitude_vision_(model, stage)
    seconds = time.perf_counter() - t0
    after = _weights(model)
    meta = {"method": stage.method, "stage": "prune", "config": stage.model_dump(mode="json"), "kind": "vision",
            "source": ctx.current.describe()}
    if stage.method == FORMAT:
        meta.update(format=FORMAT, structured={"modules": info["shapes"]},
                    note=f"structured: {info['removed_share']:.1%} of the {_unit(info)} removed (the weights shrink)")
    else:
        meta["note"] = f"pruned ({stage.describe()}); the zeros are stored dense, so the size on disk does not shrink"
    saved_dtype = storage_dtype_of(ctx.current.path)
    with ctx.task("save pruned model"), ctx.new_model_dir() as tmp:
        save_model(model, processor, tmp, meta, storage_dtype=saved_dtype)
    ctx.set_current(ctx.stage_dir / "model", loaded=(model, processor))
    data = {"method": stage.method, "requested_sparsity": stage.target_sparsity, "pattern": stage.pattern,
            "prune_seconds": round(seconds, 3), "size_bytes": ctx.current.size_bytes,
            "weights_before": before, "weights_after": after, **{k: v for k, v in info.items() if k != "shapes"}}
    summary = {"method": stage.describe(), "time": f"{seconds:.1f}s", "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
    if stage.method == FORMAT:
        summary["removed"] = (f"{info['removed_share']:.1%} of {_unit(info)} in {info['blocks']} "
                              f"{'layers' if 'conv_channels_before' in info else 'blocks'}; "
                              f"{1 - after['parameters'] / before['parameters']:.1%} of all parameters")
    else:
        summary["sparsity"] = (f"{info['sparsity']['pruned_layers']:.1%} of pruned layers, "
                               f"{info['sparsity']['all_weights']:.1%} of all Linear/Conv weights")
    return StageResult(type="prune", label=stage.label, model_dir="model", data=data, summary=summary)


def _prune_structured_any_(model: Any, stage: StructuredConfig) -> dict:
    """Conv channels on a convolutional model (``prune_conv``), MLP channels on the rest."""
    from .prune_conv import is_conv_model, prune_conv_

    if is_conv_model(model):
        return prune_conv_(model, stage, stage.multiple_of if "multiple_of" in stage.model_fields_set else None)
    return prune_structured_(model, stage)


def _recalibrate(model: Any, processor: Any, stage: StructuredConfig, ctx: "RunContext", info: dict) -> None:
    """Conv models: BatchNorm statistics re-estimated on ``stage.bn_calibration`` (figures into ``info``)."""
    from .data import load_images, model_input
    from .prune_conv import is_conv_model, recalibrate_batchnorm_

    if stage.bn_calibration is None or not is_conv_model(model):
        return
    cfg = stage.bn_calibration.with_split("train")
    if ctx.model_task == "object-detection" and cfg.source == DIGITS:  # the default, for a detector
        cfg = cfg.model_copy(update={"source": DIGITS_DETECT})
    data = load_images(cfg, ctx.recipe.base_dir, ctx.model_task)
    x = model_input(list(data.images), processor, model)
    info["bn_calibration"] = {"data": f"{cfg.source} ({cfg.split} split)", "images": len(data),
                              **recalibrate_batchnorm_(model, x)}


def _unit(info: dict) -> str:
    return "conv channels" if "conv_channels_before" in info else "MLP channels"


def _weights(model: Any) -> dict:
    return {"parameters": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------------------------------
# magnitude on Linear + Conv2d


def prune_magnitude_vision_(model: Any, cfg: Any) -> dict:
    """Zero the smallest |w| of every Linear and Conv2d not skipped (per layer), in place; returns the figures."""
    import torch

    from ..prune.base import prune_mask

    nm = cfg.n_m
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    pruned, left = [], {}
    for name, m in layers:
        if cfg.skips(name):
            continue
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        if nm and w.shape[1] % nm[1]:
            left[name] = f"width {w.shape[1]} is not a multiple of M = {nm[1]}"
            continue
        mask = prune_mask(w.float().abs(), cfg, per_row=False)
        with torch.no_grad():
            m.weight.masked_fill_(mask.reshape(m.weight.shape), 0)
        pruned.append(name)
    if not pruned:
        raise RecipeError(f"no Linear or Conv2d layer left to prune (skip={cfg.skip}"
                          f"{', N:M does not fit: ' + ', '.join(left) if left else ''}). Fix: skip fewer layers.")
    by_name = dict(layers)

    def zeros(names) -> tuple[int, int]:
        return (sum(int((by_name[n].weight == 0).sum()) for n in names),
                sum(by_name[n].weight.numel() for n in names))

    z, t = zeros(pruned)
    za, ta = zeros(list(by_name))
    by_type: dict[str, list[int]] = {}
    for n in pruned:
        acc = by_type.setdefault(type(by_name[n]).__name__, [0, 0])
        acc[0] += int((by_name[n].weight == 0).sum())
        acc[1] += by_name[n].weight.numel()
    sparsity = {"pruned_layers": z / t, "all_weights": za / ta, "by_type": {k: a / b for k, (a, b) in by_type.items()},
                "pruned_modules": len(pruned), "pruned_weights": t,
                "counted": "exact zeros in the weights after pruning (pre-existing zeros included)"}
    out = {"sparsity": sparsity, "left_dense": left,
           "storage": "dense: zeros are stored as ordinary weights, so the size on disk and in memory does not shrink"}
    if nm:
        from ..prune.base import nm_pattern_holds

        out["pattern_holds"] = all(nm_pattern_holds(by_name[n].weight.detach().reshape(
            by_name[n].weight.shape[0], -1), *nm) for n in pruned)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# structured: MLP channels


def mlp_blocks(model: Any) -> list[tuple[str, str, str | None]]:
    """``(up, down, between)`` module names of every MLP block of a supported architecture."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in MLP_PAIRS:
        from .prune_conv import CONV_TYPES

        raise RecipeError(f"`structured` knows the MLP blocks of {', '.join(sorted(MLP_PAIRS))} and the conv "
                          f"channels of {', '.join(sorted(CONV_TYPES))}, not `{model_type}`. "
                          "Fix: use `method: magnitude` (unstructured or N:M) for this model.")
    up, down, mid = MLP_PAIRS[model_type]
    names = dict(model.named_modules())
    blocks = []
    for name in names:
        if name == up or name.endswith("." + up):
            prefix = name[: -len(up)]
            if prefix + down in names:
                blocks.append((name, prefix + down, (prefix + mid) if mid and prefix + mid in names else None))
    return blocks


def prune_structured_(model: Any, cfg: StructuredConfig) -> dict:
    """Remove the least important hidden channels of every MLP block, in place; returns figures and new shapes."""
    import torch

    from ..models.skeleton import set_module

    blocks = [b for b in mlp_blocks(model) if not (cfg.skips(b[0]) or cfg.skips(b[1]))]
    if not blocks:
        raise RecipeError(f"`skip` {cfg.skip} leaves no MLP block to prune. Fix: skip fewer layers.")
    shapes, kept_total, hidden_total = {}, 0, 0
    for up_name, down_name, mid_name in blocks:
        up, down = model.get_submodule(up_name), model.get_submodule(down_name)
        hidden = up.out_features
        keep_n = max(cfg.multiple_of, round(hidden * (1 - cfg.sparsity) / cfg.multiple_of) * cfg.multiple_of)
        keep_n = min(hidden, keep_n)
        score = up.weight.detach().float().norm(dim=1) * down.weight.detach().float().norm(dim=0)
        keep = score.topk(keep_n).indices.sort().values
        new_up = _linear(up.weight[keep], None if up.bias is None else up.bias[keep])
        new_down = _linear(down.weight[:, keep], down.bias)
        set_module(model, up_name, new_up)
        set_module(model, down_name, new_down)
        if mid_name is not None:  # ConvNeXt V2 GRN: weight/bias (1, 1, 1, hidden)
            mid = model.get_submodule(mid_name)
            for attr in ("weight", "bias"):
                p = getattr(mid, attr)
                setattr(mid, attr, torch.nn.Parameter(p.detach()[..., keep].clone()))
        shapes[up_name], shapes[down_name] = list(new_up.weight.shape), list(new_down.weight.shape)
        kept_total += keep_n
        hidden_total += hidden
    return {"blocks": len(blocks), "hidden_before": hidden_total, "hidden_after": kept_total,
            "removed_share": 1 - kept_total / hidden_total, "multiple_of": cfg.multiple_of, "shapes": shapes,
            "storage": "shrunk: the removed channels are gone from the weights (smaller on disk and in memory)"}


def _linear(weight: Any, bias: Any):
    import torch

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                          device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin
