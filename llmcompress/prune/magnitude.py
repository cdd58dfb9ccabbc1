"""Magnitude pruning: zero the weights of smallest absolute value. No data needed; the baseline Wanda must beat.

    - {type: prune, method: magnitude, sparsity: 0.5}
    - {type: prune, method: magnitude, pattern: "2:4"}

Unstructured, the smallest ``sparsity`` fraction of each layer's weights goes (one threshold per layer, the classic
layer-wise variant); N:M, the M - N smallest of every M consecutive inputs of a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from .base import PruneConfig, apply_mask_, load_dense_copy, prune_mask, untie_

if TYPE_CHECKING:
    from ..context import RunContext


class MagnitudeConfig(PruneConfig):
    """Smallest |weight| first: ``{type: prune, method: magnitude, sparsity: 0.5}``."""

    method: Literal["magnitude"] = "magnitude"

    def prune(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        model, tokenizer = load_dense_copy(ctx)
        targets = self.targets(model)
        untied = untie_(model, targets)
        prune_magnitude_(targets, self)
        return model, tokenizer, {"pruned": [n for n, _ in targets], "untied": untied}


def prune_magnitude_(targets: list[tuple[str, Any]], cfg: PruneConfig) -> None:
    """Zero the lowest-|W| weights of each ``(name, nn.Linear)`` in ``targets``, in place."""
    for _, lin in targets:
        apply_mask_(lin, prune_mask(lin.weight.detach().float().abs(), cfg, per_row=False))
