"""The layer-by-layer pass of pruning methods that look at activations (Wanda; SparseGPT later): each decoder layer
is calibrated on the outputs of the already-pruned layers before it, as in the Wanda and SparseGPT code.
The calibration text itself comes from ``llmcompress.data`` (shared with GPTQ, AWQ, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import RecipeError
from ..models.walk import call_layer, first_layer_inputs, layer_types

if TYPE_CHECKING:
    import torch

#: Samples per forward pass while calibrating (activations of 8 x seq_len tokens are small at these sizes).
BATCH = 8


def decoder_layers(model) -> tuple[str, Any]:
    """``(name, ModuleList)`` of the model's decoder layers: the ModuleList of ``num_hidden_layers`` blocks that hold
    linear layers (``model.layers`` in llama-style models)."""
    import torch

    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) and (n is None or len(mod) == n)
             and any(isinstance(x, torch.nn.Linear) for x in mod[0].modules())]
    if not found:
        raise RecipeError(
            f"could not find the decoder layers of `{type(model).__name__}` (a ModuleList of {n} blocks) to calibrate "
            "layer by layer. Fix: use `method: magnitude`, which needs no calibration."
        )
    return max(found, key=lambda nm: len(nm[1]))


def _as_float32(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _as_float32(v) for k, v in obj.items()}
    return obj


def input_norms_sq(modules: dict[str, Any], run: Callable[[], None]) -> dict[str, "torch.Tensor"]:
    """Sum over calibration tokens of x_j^2 for each input channel j of each module, while ``run()`` runs."""
    import torch

    sums = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for n, m in modules.items()}
    return input_statistics(modules, run, sums, lambda x: (x * x).sum(0))


def input_statistics(modules: dict[str, Any], run: Callable[[], None], sums: dict[str, "torch.Tensor"],
                     stat: Callable[["torch.Tensor"], "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Add ``stat(x)`` of each module's inputs ``x`` (tokens, in; float64) to ``sums[name]`` while ``run()`` runs."""
    import torch

    def make_hook(name: str):
        def hook(module, args, output):
            sums[name] += stat(args[0].detach().reshape(-1, module.in_features).double())

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sums


def float_layers(model, ids: "torch.Tensor") -> Iterator[tuple[str, Any, Callable[[], None]]]:
    """Walk the decoder layers in order as ``(prefix, work, run)``: ``work`` is a float32 copy of the layer, and
    ``run()`` passes the layer's calibration inputs through it (hooks on its modules see them). Once the caller has
    changed ``work`` (pruned, factorized), its outputs become the next layer's inputs, so each layer is calibrated on
    what the already-changed layers before it output, as in the Wanda and SparseGPT code. float32: bf16 matmuls on CPUs
    without native bf16 are ~6x slower, and float32 statistics are more exact."""
    import copy

    import torch

    list_name, layers = decoder_layers(model)
    captured = first_layer_inputs(model, layers, ids, BATCH)
    hiddens = [_as_float32(h) for h, _ in captured]
    by_type = [_as_float32(kw) for _, kw in captured]
    for i, (layer, kind) in enumerate(zip(layers, layer_types(model, layers))):
        work = copy.deepcopy(layer).float()
        batches = [(h, kw[kind]) for h, kw in zip(hiddens, by_type)]

        def run(work: Any = work, batches: list = batches) -> None:
            for h, kw in batches:
                call_layer(work, h, kw)

        yield f"{list_name}.{i}.", work, run
        with torch.no_grad():
            hiddens = [call_layer(work, h, kw) for h, kw in batches]


def forward_passes(model, ids: "torch.Tensor", loss: bool = False) -> float | None:
    """Whole forward passes of ``model`` over ``ids`` in batches of BATCH (no gradients); with ``loss``, return the
    mean next-token loss over every predicted token."""
    import torch

    device = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in ids.split(BATCH):
            batch = batch.to(device)
            out = model(input_ids=batch, use_cache=False, **({"labels": batch} if loss else {}))
            if loss:
                tokens = batch[:, 1:].numel()
                total, n = total + float(out.loss) * tokens, n + tokens
    return total / n if loss and n else None


def full_passes(model, ids: "torch.Tensor") -> Callable[[], None]:
    """A ``run`` for the statistics helpers: whole forward passes of ``model`` over ``ids``."""
    return lambda: forward_passes(model, ids)  # None: no loss asked


def layer_by_layer(
    model,
    ids: "torch.Tensor",
    targets: dict[str, Any],
    prune_layer: Callable[[dict[str, Any], dict[str, "torch.Tensor"]], dict[str, "torch.Tensor"]],
    advance: Callable[..., None] = lambda *a, **k: None,
) -> None:
    """Prune the decoder layers one after another, each seeing the outputs of the already-pruned layers before it.

    For each layer, ``prune_layer(modules, norms_sq)`` gets the layer's targets (name -> nn.Linear of ``model``) and
    their input statistics on the calibration windows (see ``input_norms_sq``), prunes them in place and returns
    name -> mask (True = pruned); the layer's outputs are then recomputed with that pruning for the next layer (the
    passes run on a float32 copy of each layer, see ``float_layers``).
    """
    import torch

    for prefix, work, run in float_layers(model, ids):
        mine = {n: m for n, m in targets.items() if n.startswith(prefix)}
        work_mods = {n: work.get_submodule(n[len(prefix):]) for n in mine}
        masks = prune_layer(mine, input_norms_sq(work_mods, run))
        with torch.no_grad():
            for n, mask in masks.items():
                work_mods[n].weight.masked_fill_(mask.to(work_mods[n].weight.device), 0)
        advance(1)


def outside_layers_norms(model, ids: "torch.Tensor", modules: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """Input statistics of targets outside the decoder layers (an unskipped lm_head), from full forward passes."""
    return input_norms_sq(modules, full_passes(model, ids))
