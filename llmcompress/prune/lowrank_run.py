"""The lowrank stage's run: plan the ranks (refusing an unreachable target before any calibration), factorize,
save the folder in the ``lowrank`` layout, and report parameters, ranks, size and time."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..stage import StageResult

if TYPE_CHECKING:
    from ..context import RunContext

#: ``format`` of a lowrank folder (llmcompress.json), and the meta key that lists its modules and ranks.
FORMAT = "lowrank"


def run_lowrank(cfg: Any, ctx: "RunContext") -> StageResult:
    """Run the stage ``cfg`` (a ``lowrank.LowRankConfig``; not imported here, which imports this module)."""
    from ..models.loading import save_model, storage_dtype_of
    from .base import check_dense, load_dense_copy
    from .lowrank_plan import removed

    if ctx.current.meta.get("format") == FORMAT:
        raise RecipeError("the model here is already factorized by an earlier lowrank stage. Fix: use one lowrank "
                          "stage with the combined `target`.")
    check_dense(ctx.current)
    t0 = time.perf_counter()
    model, tokenizer = load_dense_copy(ctx)
    before = count_params(model)
    shapes = cfg.targets(model)
    ranks = cfg.plan(shapes, before)  # raises on an unreachable target, before any calibration
    if not ranks:
        raise RecipeError(f"`rank_fraction: {cfg.rank_fraction}` leaves no layer smaller than it is dense (a pair "
                          "pays only when rank x (out + in) < out x in). Fix: use a lower rank_fraction.")
    calibration = None
    with ctx.task(f"prune {cfg.describe()}", total=None):
        model, calibration = _factorize(cfg, ctx, model, tokenizer, ranks)
    seconds = time.perf_counter() - t0
    after = count_params(model)
    assert before - after == removed(ranks, shapes), "parameter count differs from the plan"  # internal invariant
    info = rank_summary(ranks, shapes)
    meta = {"format": FORMAT, "method": cfg.method, "stage": "prune", "config": cfg.model_dump(mode="json"),
            "source": ctx.current.describe(), FORMAT: {"modules": ranks, "whitening": cfg.whitening},
            "note": f"low-rank factorized ({cfg.describe()}): each listed module is a pair <module>.lowrank_a "
            "(rank x in) then <module>.lowrank_b (out x rank); load with llmcompress load_model"}
    saved_dtype = storage_dtype_of(ctx.current.path)
    with ctx.task("save factorized model"), ctx.new_model_dir() as tmp:
        save_model(model, tokenizer, tmp, meta, storage_dtype=saved_dtype)
    ctx.set_current(ctx.stage_dir / "model", loaded=(model, tokenizer))
    data = {
        "method": cfg.method,
        "whitening": cfg.whitening,
        "requested": {"target": cfg.target, "rank_fraction": cfg.rank_fraction,
                      "allocation": cfg.allocation if cfg.target is not None else None},
        "params_before": before,
        "params_after": after,
        "removed_share": (before - after) / before,
        "ranks": info,
        "left_dense": sorted(set(shapes) - set(ranks)),
        "prune_seconds": round(seconds, 3),
        "size_bytes": ctx.current.size_bytes,
        "saved_dtype": saved_dtype or str(model.dtype).removeprefix("torch."),
        "storage": "low-rank pairs (lowrank_a, lowrank_b) in place of the dense weights: smaller on disk and in memory",
        "calibration": calibration,
    }
    summary = {
        "method": cfg.describe(),
        "parameters": f"{_count(before)} -> {_count(after)} (-{data['removed_share']:.1%})",
        "ranks": f"{len(ranks)} layers at {info['rank_fraction_min']:.0%}-{info['rank_fraction_max']:.0%} of full "
        "rank" + (f", {len(data['left_dense'])} left dense" if data["left_dense"] else ""),
        "time": f"{seconds:.1f}s",
        "size": f"{data['size_bytes'] / 2**20:.1f} MiB",
    }
    return StageResult(type="prune", label=cfg.label, model_dir="model", data=data, summary=summary)


def _factorize(cfg: Any, ctx: "RunContext", model, tokenizer, ranks: dict[str, int]):
    from .layerwise import decoder_layers
    from .lowrank_layers import factorize_model_

    if not cfg.whitening:
        factorize_model_(model, ranks, None, cfg.damp)
        return model, None
    from ..data import load_calibration

    t0 = time.perf_counter()
    ids = load_calibration(cfg.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (N, L)
    with ctx.task("lowrank: whitening layer by layer", total=len(decoder_layers(model)[1])) as advance:
        factorize_model_(model, ranks, ids, cfg.damp, advance)
    return model, {**cfg.calibration.record(ids), "dtype": "float32 statistics, float64 factorization",
                   "seconds": round(time.perf_counter() - t0, 3)}


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def count_params(model) -> int:
    """Parameters of ``model``, each shared tensor (a tied lm_head) once."""
    return sum(p.numel() for p in model.parameters())


def rank_summary(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Ranks by layer type (``q_proj``: the ranks used and the full rank), and the least and most kept fraction."""
    by_type: dict[str, dict[str, Any]] = {}
    for name, r in ranks.items():
        kind = by_type.setdefault(name.split(".")[-1], {"ranks": set(), "full_rank": min(shapes[name]), "layers": 0})
        kind["ranks"].add(r)
        kind["layers"] += 1
    fractions = [r / min(shapes[n]) for n, r in ranks.items()]
    return {
        "by_type": {k: {**v, "ranks": sorted(v["ranks"])} for k, v in sorted(by_type.items())},
        "rank_fraction_min": min(fractions),
        "rank_fraction_max": max(fractions),
        "factorized_modules": len(ranks),
    }
