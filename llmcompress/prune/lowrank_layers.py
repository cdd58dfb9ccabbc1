"""The arithmetic of low-rank factorization: the ``LowRankLinear`` pair that replaces an ``nn.Linear``, the truncated
(optionally whitened) SVD that makes it, and the layer-by-layer pass that collects each layer's input Gram matrix.

SVD-LLM (Wang et al., 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for LLM Compression"): with the
calibration inputs X (tokens, in) of a layer W (out, in), let S be the Cholesky factor of X^T X (S S^T = X^T X).
Then ||(W - W') X^T||_F = ||(W - W') S||_F, so the best rank-r W' for the layer's *outputs* is the truncated SVD of
W S mapped back: W' = U_r Σ_r V_r^T S^-1. Plain SVD (the baseline) truncates W itself, which is best for the weights
but not for what the layer computes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch  # this module is imported only when a lowrank stage runs or a lowrank folder loads


class LowRankLinear(torch.nn.Module):
    """``y = B (A x) + bias``: ``lowrank_a`` (in -> rank, no bias) then ``lowrank_b`` (rank -> out, the original
    bias). Two plain ``nn.Linear`` layers, so code that handles Linear layers (saving, dtype casts) sees them."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lowrank_a = torch.nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lowrank_b = torch.nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank_b(self.lowrank_a(x))  # (..., in) -> (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def whitening_factor(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular S with S S^T = X^T X + damp * mean(diag) * I, float64. The damping keeps Cholesky defined
    when some input channel never moves (a rank-deficient X^T X) and keeps S^-1 from amplifying directions the
    calibration text barely visits."""
    g = gram.double()
    g = g + damp * g.diagonal().mean().clamp_min(1e-12) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.cholesky(g)


def factorize(weight: torch.Tensor, rank: int, white: torch.Tensor | None = None):
    """``(A, B)`` with B @ A the best rank-``rank`` approximation of ``weight`` (out, in): of its outputs on the
    calibration inputs when ``white`` (S from ``whitening_factor``) is given, of the weights themselves otherwise.
    A: (rank, in), B: (out, rank), float64; the singular values are split evenly (sqrt into each), as SVD-LLM does."""
    w = weight.detach().double()
    target = w @ white if white is not None else w  # (out, in)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root[None, :]  # (out, r)
    a = root[:, None] * vh[:rank]  # (r, in)
    if white is not None:  # A S^-1, as the solution X of X S = A (S lower triangular)
        a = torch.linalg.solve_triangular(white, a, upper=False, left=False)
    return a, b


def low_rank_pair(linear: Any, a: torch.Tensor, b: torch.Tensor) -> Any:
    """A ``LowRankLinear`` holding ``a`` and ``b`` (cast to ``linear``'s dtype) and ``linear``'s bias."""
    w = linear.weight
    pair = LowRankLinear(linear.in_features, linear.out_features, a.shape[0], linear.bias is not None,
                         dtype=w.dtype, device=w.device)
    with torch.no_grad():
        pair.lowrank_a.weight.copy_(a.to(w.dtype))
        pair.lowrank_b.weight.copy_(b.to(w.dtype))
        if linear.bias is not None:
            pair.lowrank_b.bias.copy_(linear.bias)
    pair.requires_grad_(False)
    return pair


def input_grams(modules: dict[str, Any], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """X^T X (in, in), float64, of each module's inputs over every calibration token while ``run()`` runs."""
    from .layerwise import input_statistics

    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
             for n, m in modules.items()}
    return input_statistics(modules, run, grams, lambda x: x.T @ x)


def factorize_model_(model, ranks: dict[str, int], ids: torch.Tensor | None, damp: float,
                     advance: Callable[..., None] = lambda *a, **k: None) -> None:
    """Replace each module named in ``ranks`` by a ``LowRankLinear`` of that rank, in place.

    ``ids`` None: plain SVD of each weight. Otherwise SVD-LLM whitening, decoder layer after decoder layer: each
    layer's X^T X is measured on the outputs of the already-factorized layers before it (as Wanda and SparseGPT
    calibrate), in float32 on a copy of the layer; modules outside the decoder layers (an unskipped lm_head) are
    whitened on full forward passes of the factorized model.
    """
    from .layerwise import decoder_layers, float_layers, full_passes

    if ids is None:
        for name, rank in ranks.items():
            _replace(model, name, factorize(model.get_submodule(name).weight, rank))
        return
    list_name, _ = decoder_layers(model)
    for prefix, work, run in float_layers(model, ids):
        mine = {n: r for n, r in ranks.items() if n.startswith(prefix)}
        if mine:
            work_mods = {n: work.get_submodule(n[len(prefix):]) for n in mine}
            grams = input_grams(work_mods, run)
            for name, rank in mine.items():
                a, b = factorize(work_mods[name].weight, rank, whitening_factor(grams[name], damp))
                _replace(model, name, (a, b))
                with torch.no_grad():  # the next layer calibrates on what this factorized layer outputs
                    work_mods[name].weight.copy_((b @ a).to(torch.float32))
        advance(1)
    outside = {n: r for n, r in ranks.items() if not n.startswith(list_name + ".")}
    if outside:
        mods = {n: model.get_submodule(n) for n in outside}
        grams = input_grams(mods, full_passes(model, ids))
        for name, rank in outside.items():
            _replace(model, name, factorize(mods[name].weight, rank, whitening_factor(grams[name], damp)))


def _replace(model, name: str, factors: tuple) -> None:
    from ..models.skeleton import set_module

    set_module(model, name, low_rank_pair(model.get_submodule(name), *factors))
