"""``method: structured`` on convolutional models (ResNet, MobileNetV2 classifiers; the RT-DETR detector's ResNet
backbone and conv neck): whole conv channels removed with torch-pruning's dependency graph, so the convs, their
BatchNorms (frozen ones too, through a small custom pruner), the residual adds and the depthwise convs (groups) all
shrink together and the model runs fewer FLOPs. RT-DETR's transformer parts (input projections' outputs, AIFI
encoder layer, decoder) keep their widths.

    - {type: prune, method: structured, sparsity: 0.5, multiple_of: 8}

Each prunable layer loses ``sparsity`` of its output channels (rounded so the kept count is a multiple of
``multiple_of``; 8 unless set), ranked by the L2 norm of each channel group's weights (torch-pruning's
``GroupMagnitudeImportance``: a channel's filter, its BatchNorm entries and the input slices of the layers that read
it). The classifier's outputs and the image's input channels stay. Then every BatchNorm's running statistics are
re-estimated on ``bn_calibration`` images (256 training digits by default; no weights change): without it the pruned
digits ResNet falls to chance, with it it keeps ~98% top-1 before any fine-tuning (docs/notes/issue20-vision-conv.md).
Frozen BatchNorms keep their statistics (they are buffers by design). The folder is ``format: structured``: each
changed Conv2d / BatchNorm2d / frozen norm / Linear is listed with its new shape in ``llmcompress.json`` and
``models/skeleton`` rebuilds it.
"""

from __future__ import annotations

from typing import Any

from ..errors import RecipeError

#: model_type -> what the dependency graph walks (transformers' model of that type).
CONV_TYPES = {"resnet": "ResNetForImageClassification", "mobilenet_v2": "MobileNetV2ForImageClassification",
              "rt_detr": "RTDetrForObjectDetection"}
#: Detectors: only convs under these prefixes lose channels (RT-DETR: the ResNet backbone and the hybrid encoder's
#: conv neck, whose output width, ``encoder_hidden_dim``, stays because the input projections keep their outputs).
PRUNABLE_PREFIXES = {"rt_detr": ("model.backbone.", "model.encoder.")}
#: ``multiple_of`` when a conv recipe leaves it unset (the MLP default, 64, is wider than small convs).
CONV_MULTIPLE_OF = 8


def is_conv_model(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in CONV_TYPES


def prune_conv_(model: Any, cfg: Any, multiple_of: int | None = None) -> dict:
    """Remove ``cfg.sparsity`` of the output channels of every prunable conv, in place; returns the figures and the
    new shape of every changed layer (``{"modules": {name: spec}}`` for ``llmcompress.json``)."""
    import torch

    tp = _torch_pruning()
    before = _layer_shapes(model)
    ignored = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or cfg.skips(n)
               or (isinstance(m, torch.nn.Conv2d) and not _prunable(model, n))]
    narrow = _too_narrow(model, ignored, multiple_of or CONV_MULTIPLE_OF, cfg.sparsity)
    if narrow and multiple_of:
        name, width, most = narrow[0]
        raise RecipeError(f"`multiple_of: {multiple_of}` with `sparsity: {cfg.sparsity}` keeps none of layer "
                          f"`{name}`'s {width} output channels (it would keep {most}, rounded down to a multiple of "
                          f"{multiple_of}). Fix: set `multiple_of` to at most {max(most, 1)}, lower `sparsity`, or "
                          "`skip` that layer.")
    multiple_of = multiple_of or CONV_MULTIPLE_OF
    ignored += [model.get_submodule(name) for name, _, _ in narrow]  # unset multiple_of: narrow layers stay whole
    wrapper = _logits_only(model)
    example = torch.zeros(1, getattr(model.config, "num_channels", 3), *_image_size(model),
                          dtype=next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    pruner = tp.pruner.MetaPruner(wrapper, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=cfg.sparsity, ignored_layers=ignored, round_to=multiple_of,
                                  global_pruning=False, customized_pruners=_frozen_norm_pruners(model, tp))
    pruner.step()
    model.train(was_training)
    after = _layer_shapes(model)
    changed = {n: after[n] for n in after if after[n] != before[n]}
    convs = [n for n, s in before.items() if "conv2d" in s]
    out_before = sum(before[n]["conv2d"][0] for n in convs)
    out_after = sum(after[n]["conv2d"][0] for n in convs)
    if not changed:
        raise RecipeError(f"`sparsity: {cfg.sparsity}` with `multiple_of: {multiple_of}` removes no channel of "
                          "this model. Fix: raise `sparsity` or lower `multiple_of`.")
    return {"blocks": sum(1 for n in changed if "conv2d" in changed[n]), "left_whole": [n for n, _, _ in narrow],
            "conv_channels_before": out_before,
            "conv_channels_after": out_after, "removed_share": 1 - out_after / out_before,
            "multiple_of": multiple_of, "importance": "L2 norm of each channel group (torch-pruning)",
            "shapes": {n: _spec(s) for n, s in changed.items()},
            "storage": "shrunk: the removed channels are gone from the weights (smaller on disk and in memory)"}


def recalibrate_batchnorm_(model: Any, x: Any, batch_size: int = 64) -> dict:
    """Re-estimate every BatchNorm2d's running mean and variance from forward passes on ``x`` (a cumulative average,
    no gradient, no weight changes): pruning removed channels the old statistics counted on."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(pixel_values=x[i: i + batch_size])
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return {"batchnorms": len(norms), "batch_size": batch_size}


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise RecipeError("`structured` on a convolutional model needs torch-pruning. Fix: "
                          "pip install 'llmcompress[vision]' (or pip install torch-pruning).") from None
    return torch_pruning


def _prunable(model: Any, name: str) -> bool:
    prefixes = PRUNABLE_PREFIXES.get(model.config.model_type)
    return prefixes is None or (name.startswith(prefixes) and "input_proj" not in name)


def _logits_only(model: Any):
    """``model(x).logits`` (and a detector's boxes) as a plain module: torch-pruning traces tensors in and out."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(pixel_values=x)
            boxes = getattr(out, "pred_boxes", None)
            return out.logits if boxes is None else (out.logits, boxes)

    return LogitsOnly(model)


def _is_frozen_norm(module: Any) -> bool:
    """transformers' frozen BatchNorm (DETR, RT-DETR backbones): weight, bias and running stats as buffers."""
    return type(module).__name__.endswith("FrozenBatchNorm2d")


def _frozen_norm_pruners(model: Any, tp: Any) -> dict:
    """torch-pruning does not know frozen BatchNorms: without a pruner for them the convs shrink and the norms do not
    (RT-DETR: "size of tensor a (8) must match b (16)"). Each channel's four buffers go with it."""
    import torch

    class FrozenNormPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            drop = set(int(i) for i in idxs)
            keep = torch.tensor([i for i in range(layer.weight.numel()) if i not in drop], dtype=torch.long)
            for name in ("weight", "bias", "running_mean", "running_var"):
                setattr(layer, name, getattr(layer, name)[keep].clone())
            return layer

        prune_in_channels = prune_out_channels  # one channel axis: pruned together with the conv before it

        def get_out_channels(self, layer):
            return layer.weight.numel()

        get_in_channels = get_out_channels

    return {type(m): FrozenNormPruner() for m in model.modules() if _is_frozen_norm(m)}


def _image_size(model: Any) -> tuple[int, int]:
    size = getattr(model.config, "image_size", None) or 64
    size = min(int(size), 64)  # the graph only needs the layers' connections: a small image traces them all
    return size, size


def _too_narrow(model: Any, ignored: list, multiple_of: int, sparsity: float) -> list[tuple[str, int, int]]:
    """``(name, channels, would keep)`` of each conv that would keep no channel: torch-pruning rounds the kept count
    down to ``multiple_of``."""
    import torch

    skip = {id(m) for m in ignored}
    return [(name, m.out_channels, int(m.out_channels * (1 - sparsity))) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and id(m) not in skip and m.out_channels * (1 - sparsity) < multiple_of]


def _layer_shapes(model: Any) -> dict[str, dict]:
    import torch

    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            shapes[name] = {"conv2d": [m.out_channels, m.in_channels, m.groups]}
        elif isinstance(m, torch.nn.BatchNorm2d):
            shapes[name] = {"batchnorm2d": m.num_features}
        elif isinstance(m, torch.nn.Linear):
            shapes[name] = {"linear": [m.out_features, m.in_features]}
        elif _is_frozen_norm(m):
            shapes[name] = {"frozen_norm": m.weight.numel()}
    return shapes


def _spec(shape: dict) -> Any:
    # a Linear keeps the MLP format ([out, in]) that load_structured already reads
    return shape["linear"] if "linear" in shape else shape
