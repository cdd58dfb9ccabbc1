"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models"): prune by
weight magnitude times input activation norm, no retraining, no weight update.

    - {type: prune, method: wanda, sparsity: 0.5}
    - {type: prune, method: wanda, pattern: "2:4", calibration: {source: builtin:pydoc, samples: 32, seq_len: 256}}

Score of weight W_ij (output i, input j): |W_ij| * ||X_j||_2, where X_j is input channel j over every calibration token.
Weights compete within their output row (unstructured: the lowest ``sparsity`` fraction of each row goes) or within
each group of M consecutive inputs of a row (N:M). Layers are pruned one after another, each calibrated on the outputs
of the already-pruned layers before it, as in the paper's code (which used 128 x 2048 tokens of C4 and found Wanda
robust to far fewer). The default calibration text, Python's docs, is also what the default evaluation reads: the
figures are in-domain (``skip_tokens`` keeps clear of the perplexity windows, not of the lm-eval passages).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..data import CalibrationConfig
from .base import PruneConfig, apply_mask_, load_dense_copy, prune_mask, untie_

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..context import RunContext


class WandaConfig(PruneConfig):
    """|W| x input-activation norm, per output row: ``{type: prune, method: wanda, pattern: "2:4"}``."""

    method: Literal["wanda"] = "wanda"
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text whose activations weigh the weights."
    )

    def preflight(self, base_dir: "Path | None" = None) -> None:
        from ..data import check_calibration

        check_calibration(self.calibration, base_dir)

    def prune(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        from ..data import load_calibration
        from .layerwise import decoder_layers

        model, tokenizer = load_dense_copy(ctx)
        t0 = time.perf_counter()
        ids = load_calibration(self.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (N, L)
        targets = self.targets(model)
        untied = untie_(model, targets)
        with ctx.task("wanda: layer by layer", total=len(decoder_layers(model)[1])) as advance:
            prune_wanda_(model, ids, dict(targets), self, advance)
        info = {
            "pruned": [n for n, _ in targets],
            "untied": untied,
            "calibration": {**self.calibration.record(ids), "dtype": "float32",
                            "seconds": round(time.perf_counter() - t0, 3)},
        }
        return model, tokenizer, info


def wanda_score(weight: "torch.Tensor", norms_sq: "torch.Tensor") -> "torch.Tensor":
    """|W| * ||X_j||_2, shape (out, in), float32. ``norms_sq``: (in,) sums of squared inputs per channel."""
    return weight.detach().float().abs() * norms_sq.sqrt().float().to(weight.device)[None, :]


def prune_wanda_(model, ids: "torch.Tensor", targets: dict[str, Any], cfg: PruneConfig, advance=lambda *a, **k: None):
    """Prune ``targets`` (name -> nn.Linear of ``model``) in place by Wanda score on the calibration ``ids``."""
    from .layerwise import decoder_layers, layer_by_layer, outside_layers_norms

    def prune_layer(modules: dict[str, Any], norms: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        masks = {}
        for name, lin in modules.items():
            masks[name] = prune_mask(wanda_score(lin.weight, norms[name]), cfg, per_row=True)
            apply_mask_(lin, masks[name])
        return masks

    layer_by_layer(model, ids, targets, prune_layer, advance)
    list_name, _ = decoder_layers(model)
    outside = {n: m for n, m in targets.items() if not n.startswith(list_name + ".")}
    if outside:  # e.g. an unskipped lm_head: its inputs come from the (now pruned) model's last layer
        prune_layer(outside, outside_layers_norms(model, ids, outside))
