"""Depth pruning of language models: remove whole decoder layers, the ones that change the hidden state least.

    - {type: prune, method: depth, layers: 6}        # remove 6 decoder layers
    - {type: prune, method: depth, target: 0.2}      # as many layers as remove 20% of the parameters (rounded up)

Importance (``importance: block-influence``, ShortGPT, Men et al., 2024): a layer's block influence is 1 - cos(h_in,
h_out), the cosine between the hidden state entering and leaving it, averaged over the calibration tokens; the lowest
go. ``importance: perplexity`` (Shortened LLaMA's PPL criterion, Kim et al., 2024) removes layers greedily, one at a
time, each time the one whose removal raises the calibration text's loss least (a forward pass per candidate, from the
candidate on: ~L x cut partial passes; on SmolLM2-135M it beats block influence on both evaluated texts,
docs/notes/issue20-prune.md). ``importance: last`` removes the deepest layers but the final one (Gromov et al., 2024,
"The Unreasonable Ineffectiveness of the Deeper Layers"), needing no calibration pass. The kept layers keep their order;
config.json gets the new ``num_hidden_layers`` (and ``layer_types``, where the model has one), so the folder is a plain
transformers checkpoint.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import RecipeError
from ..models.walk import configs, layer_types
from .shrink import Shape, ShrinkConfig, calibrate, decoder, fraction_target, with_

if TYPE_CHECKING:
    from ..context import RunContext


class DepthConfig(ShrinkConfig):
    """Remove whole decoder layers: ``{type: prune, method: depth, layers: 6}``."""

    method: Literal["depth"] = "depth"
    layers: int | None = Field(None, ge=1, description="Decoder layers to remove.")
    target: float | None = Field(None, description="Share of the model's parameters to remove (0 < target < 1), "
                                 "rounded up to whole layers.")
    importance: Literal["block-influence", "perplexity", "last"] = Field(
        "block-influence", description="block-influence: the layers whose output is most like their input go "
        "(ShortGPT); perplexity: one at a time, the layer whose removal raises the calibration loss least (Shortened "
        "LLaMA; a forward pass per candidate); last: the deepest layers but the final one go.")

    _target = field_validator("target")(classmethod(lambda cls, v: fraction_target(v)))

    @model_validator(mode="after")
    def _one(self) -> "DepthConfig":
        if (self.layers is None) == (self.target is None):
            given = "both are" if self.layers else "neither is"
            raise ValueError("set exactly one of `layers` (decoder layers to remove, e.g. layers: 6) and `target` "
                             f"(a share of the parameters, e.g. target: 0.2); {given} set")
        return self

    def describe(self) -> str:
        return f"depth -{self.layers} layers" if self.layers else f"depth {self.target:.0%}"

    def plan(self, shape: Shape) -> Shape:
        where = f"method depth ({shape.layers} decoder layers)"
        if self.layers is not None:
            cut = self.layers
        else:
            per_layer = shape.params() - with_(shape, layers=shape.layers - 1).params()
            cut = math.ceil(self.target * shape.params() / per_layer - 1e-9)  # type: ignore[operator]
        if cut >= shape.layers:
            what = f"`layers: {cut}`" if self.layers else f"`target: {self.target}` ({cut} layers)"
            raise RecipeError(f"{where}: {what} would remove every decoder layer the model has. Fix: remove at most "
                              f"{shape.layers - 1}")
        return with_(shape, layers=shape.layers - cut)

    def shrink_(self, model: Any, ids: Any, shape: Shape, new: Shape, ctx: "RunContext") -> dict:
        import torch

        _, layers = decoder(model)
        extra: dict = {}
        if self.importance == "last":
            scores = None
            drop = list(range(shape.layers - 1 - (shape.layers - new.layers), shape.layers - 1))
        elif self.importance == "perplexity":
            scores = None
            drop, extra["loss_after_each_removal"] = greedy_by_loss(model, ids, shape.layers - new.layers)
            drop = sorted(drop)
        else:
            scores = block_influence(model, ids)
            drop = sorted(scores.topk(shape.layers - new.layers, largest=False).indices.tolist())
        keep = [i for i in range(shape.layers) if i not in drop]
        base, _ = decoder(model)
        base.layers = torch.nn.ModuleList([layers[i] for i in keep])
        for j, layer in enumerate(base.layers):  # the KV cache is indexed by layer_idx
            for mod in layer.modules():
                if hasattr(mod, "layer_idx"):
                    mod.layer_idx = j
        for cfg in configs(model):
            cfg.num_hidden_layers = new.layers
            if getattr(cfg, "layer_types", None) and len(cfg.layer_types) == shape.layers:
                cfg.layer_types = [cfg.layer_types[i] for i in keep]
        return {"importance": self.importance, "layers_removed": drop, **extra,
                **({"block_influence": [round(float(s), 6) for s in scores]} if scores is not None else {})}


def block_influence(model: Any, ids: Any) -> Any:
    """Per decoder layer: 1 - mean over tokens of cos(hidden state in, hidden state out)."""
    import torch

    _, layers = decoder(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = [0]

    def hook(i: int):
        def run(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).detach().double()
            h_out = (output[0] if isinstance(output, (tuple, list)) else output).detach().double()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            total[i] += (1 - cos).sum()
            if i == 0:
                count[0] += cos.numel()

        return run

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        calibrate(model, ids, {})
    finally:
        for h in handles:
            h.remove()
    if not count[0]:
        raise RecipeError("depth: the calibration text gave no tokens. Fix: check `calibration`")
    return total / count[0]


def greedy_by_loss(model: Any, ids: Any, cut: int) -> tuple[list[int], list[float]]:
    """Remove ``cut`` layers one at a time, each time the one whose removal gives the lowest mean next-token loss on
    ``ids``. Returns the layers in the order removed and the loss after each removal.

    Each round first runs the model once (without the layers already removed) and keeps the hidden state entering
    every layer; a candidate's pass then starts after it, from the state that entered it, so the layers before it
    are not run again: about half the layer passes, and the same losses to the bit (the states are the ones a whole
    pass computes). On SmolLM2-135M in bf16 (8 x 256 tokens, 2 layers) 83.5 s against 108.8 s for whole passes, as
    the output layer and the loss over 49,152 words are a large part of each pass. A candidate that is the last layer
    gets a whole pass."""
    import torch

    base, layers = decoder(model)
    types = layer_types(model, layers)
    typed = [c for c in configs(model) if getattr(c, "layer_types", None) is not None]
    saved = [c.layer_types for c in typed]

    def run(kept: list[int], pre_hooks: dict[Any, Any]) -> float:
        base.layers = torch.nn.ModuleList([layers[i] for i in kept])
        for c in typed:  # the model hands the i-th layer it runs the mask of layer_types[i]
            c.layer_types = [types[i] for i in kept]
        handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in pre_hooks.items()]
        try:
            loss = calibrate(model, ids, {}, loss=True)
        finally:
            for h in handles:
                h.remove()
        if loss is None:
            raise RecipeError("depth: the calibration text gave no tokens. Fix: check `calibration`")
        return loss

    def keep(store: list) -> Any:
        def hook(module, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).clone())
        return hook

    def inject(states: list) -> Any:
        batches = iter(states)

        def hook(module, args, kwargs):
            if args:
                return (next(batches), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": next(batches)}
        return hook

    drop: list[int] = []
    losses: list[float] = []
    try:
        for _ in range(cut):
            kept = [i for i in range(len(layers)) if i not in drop]
            entering: dict[int, list] = {i: [] for i in kept}  # per batch, the state entering each kept layer
            run(kept, {layers[i]: keep(entering[i]) for i in kept})
            tried = {}
            for p, i in enumerate(kept):
                rest = kept[p + 1:]
                # only the layers after the candidate run, fed what entered it; the last layer: a whole pass
                tried[i] = run(rest, {layers[rest[0]]: inject(entering[i])}) if rest else run(kept[:p], {})
            del entering
            best = min(tried, key=tried.__getitem__)
            drop.append(best)
            losses.append(round(tried[best], 6))
    finally:
        base.layers = layers
        for c, t in zip(typed, saved):
            c.layer_types = t
    return drop, losses
