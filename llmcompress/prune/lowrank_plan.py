"""How many ranks the lowrank method keeps: which pairs pay, the parameters they save, and the ranks that meet a
parameter target (pure arithmetic on layer shapes: no torch)."""

from __future__ import annotations

import math

from ..errors import RecipeError


def saves(rank: int, shape: tuple[int, int]) -> bool:
    """The rank-``rank`` pair of a (out, in) layer holds fewer weights: r (out + in) < out x in."""
    return rank * (shape[0] + shape[1]) < shape[0] * shape[1]


def removed(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    """Parameters the pairs save over the dense layers."""
    return sum(shapes[n][0] * shapes[n][1] - r * sum(shapes[n]) for n, r in ranks.items())


def plan_for_target(shapes: dict[str, tuple[int, int]], total: int, target: float,
                    allocation: str = "rank") -> dict[str, int]:
    """Ranks that remove at least ``target`` x ``total`` parameters and as few more as one layer's rank step allows:
    the largest share k that still removes enough, then one more rank for each layer, in order, while the target
    still holds. ``allocation`` says what k is a share of: ``rank``, each layer's full rank min(out, in) (one rank
    fraction everywhere: square layers pay only below half their rank, so they stay dense first); ``params``, the
    rank at which the pair holds as many weights as the layer, out x in / (out + in) (one parameter ratio everywhere,
    as SVD-LLM allocates: every layer loses the same share of its weights). Raises when even rank 1 cannot remove
    enough."""
    need = math.ceil(target * total)
    full = {n: (min(s) if allocation == "rank" else s[0] * s[1] / (s[0] + s[1])) for n, s in shapes.items()}

    def at(k: float) -> dict[str, int]:
        ranks = {n: max(1, math.floor(k * full[n])) for n in shapes}
        return {n: r for n, r in ranks.items() if saves(r, shapes[n])}

    most = removed(at(0.0), shapes)
    if most < need:
        raise RecipeError(
            f"`target: {target}` asks to remove {need:,} of the model's {total:,} parameters, but factorizing every "
            f"layer not skipped down to rank 1 removes only {most:,} ({most / total:.1%}: embeddings, norms and "
            f"skipped layers stay). Fix: use a target below {most / total:.2f}, or skip fewer layers."
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):  # removed(at(k)) only falls as k grows: keep removed(at(lo)) >= need
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(at(mid), shapes) >= need else (lo, mid)
    ranks = at(lo)
    for name in sorted(ranks, key=lambda n: sum(shapes[n])):  # the finest steps first
        more = {**ranks, name: ranks[name] + 1}
        if saves(more[name], shapes[name]) and removed(more, shapes) >= need:
            ranks = more
    return ranks
