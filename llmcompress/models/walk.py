"""Walking a decoder stack one layer at a time (GPTQ-style calibration: Wanda, lowrank whitening, the LoRA stage's
GPTQ refit): the inputs the model hands its decoder layers, captured once, and one layer's call on them.

Models that mix attention types (``config.layer_types``: Gemma 2/3, Qwen2 with sliding-window layers) hand each layer
the mask, and in Gemma 3 the rotary tables, of its own type, so the arguments are captured per type, not from layer 0
alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class _Stop(Exception):
    """Raised by the capture hook once every needed layer's arguments are in hand."""


def configs(model: Any) -> list[Any]:
    """The model's config and its text config (one object in a text-only model), each once: where new sizes go."""
    return list({id(c): c for c in (model.config, model.config.get_text_config())}.values())


def layer_types(model: Any, layers: Any) -> list[Any]:
    """Each decoder layer's attention type ("full_attention", "sliding_attention", ...), or None for every layer
    where the config names none."""
    types = getattr(model.config.get_text_config(), "layer_types", None)
    return list(types) if types and len(types) == len(layers) else [None] * len(layers)


def first_layer_inputs(model: Any, layers: Any, ids: "torch.Tensor",
                       batch_size: int = 8) -> list[tuple["torch.Tensor", dict[Any, dict]]]:
    """Run ``model`` on ``ids`` in batches of ``batch_size`` up to the first layer of each attention type; return each
    batch's ``(hidden state entering layer 0, {attention type: the keyword arguments a layer of that type gets})``."""
    import torch

    device = next(model.parameters()).device
    types = layer_types(model, layers)
    firsts = {t: types.index(t) for t in dict.fromkeys(types)}  # the first layer of each type
    last = max(firsts.values())
    captured: list[tuple[torch.Tensor, dict[Any, dict]]] = []

    def hook(i: int):
        def run(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                captured.append((hidden, {}))
            captured[-1][1][types[i]] = kwargs
            if i == last:
                raise _Stop

        return run

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in sorted(firsts.values())]
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return captured


def call_layer(layer: Any, hidden: "torch.Tensor", kwargs: dict) -> "torch.Tensor":
    """``layer``'s output hidden state (decoder layers return a tensor or a tuple led by one)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
