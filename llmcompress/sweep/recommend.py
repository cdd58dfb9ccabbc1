"""Recommendation rules on leaderboard rows: "smallest model with >= 95% quality recovery", "fastest under 120 MiB"."""

from __future__ import annotations

from typing import Any

from ..report import metrics as M
from ..report.leaderboard import COLUMNS, format_cell
from .config import RecommendRule

_TIEBREAK = (("quality_recovery", "higher"), ("size_bytes", "lower"), ("speedup", "higher"))


def _figure(key: str, row: dict) -> str:
    """``size 116.6 KiB``: a row's figure with the leaderboard's column title."""
    return f"{dict(COLUMNS).get(key, key.replace('_', ' '))} {format_cell(key, row.get(key))}"


def _meets(row: dict, bounds: list[tuple[str, str, float]]) -> tuple[bool, list[str]]:
    """Whether ``row`` meets every bound, and the bounds it misses (or could not be checked on)."""
    missed = []
    for key, kind, limit in bounds:
        v = row.get(key)
        if not M.is_number(v):
            missed.append(f"no {key}")
        elif (kind == "min" and v < limit) or (kind == "max" and v > limit):
            missed.append(_figure(key, row))
    return not missed, missed


def _sort_key(row: dict, objective: tuple[str, str]) -> tuple:
    def score(key: str, better: str) -> float:
        v = row.get(key)
        if not M.is_number(v):
            return float("inf")
        return -v if better == "higher" else v

    return (score(*objective), *(score(k, b) for k, b in _TIEBREAK if k != objective[0]), str(row.get("name")))


def recommend(rule: RecommendRule, rows: list[dict]) -> dict[str, Any]:
    """Apply one rule to the rows of finished runs (the original's row is not a candidate).

    Returns ``{"rule", "pick": name | None, "row", "why", "candidates", "excluded": {name: [reasons]}}``.
    """
    key, better = rule.objective
    bounds = rule.bounds()
    candidates, excluded = [], {}
    for row in rows:
        ok, missed = _meets(row, bounds)
        if ok and M.is_number(row.get(key)):
            candidates.append(row)
        else:
            excluded[row["name"]] = missed or [f"no {key}"]
    out: dict[str, Any] = {"rule": rule.describe(), "pick": None, "row": None, "candidates": len(candidates),
                           "excluded": excluded}
    if not candidates:
        out["why"] = f"no run meets it ({len(rows)} checked)" + (_closest(rows, bounds) if bounds else "")
        return out
    best = sorted(candidates, key=lambda r: _sort_key(r, rule.objective))[0]
    figures = [_figure(key, best)] + [_figure(k, best) for k, _, _ in bounds if k != key]
    out.update(pick=best["name"], row=best,
               why=f"{best['name']}: {', '.join(figures)} ({len(candidates)} of {len(rows)} runs qualify)")
    return out


def _closest(rows: list[dict], bounds: list[tuple[str, str, float]]) -> str:
    """The run that misses the bounds by the least (relative shortfall), to say how far off the best one is."""

    def shortfall(row: dict) -> float:
        total = 0.0
        for key, kind, limit in bounds:
            v = row.get(key)
            if not M.is_number(v):
                return float("inf")
            gap = (limit - v) if kind == "min" else (v - limit)
            total += max(0.0, gap) / abs(limit) if limit else max(0.0, gap)
        return total

    scored = [r for r in rows if shortfall(r) != float("inf")]
    if not scored:
        return ""
    best = min(scored, key=shortfall)
    shown = ", ".join(_figure(k, best) for k, _, _ in bounds)
    return f"; closest: {best['name']} ({shown})"
