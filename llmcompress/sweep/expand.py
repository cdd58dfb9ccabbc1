"""Sweep file -> recipes: the grid's cartesian product and the list's entries, each named and validated up front.

Every point is a base recipe plus overrides written as ``key=value`` (``llmcompress run --set`` syntax), so each
one can be re-run alone: ``llmcompress run BASE --set stages.0.bits=8 --set name=rtn-bits8``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import LLMCompressError, RecipeError
from ..recipe import Recipe, apply_override, load_recipe
from ..utils.io import read_yaml
from .config import NAME_PATTERN, SweepConfig


@dataclass
class Point:
    """One recipe of a sweep."""

    index: int
    name: str
    source: str  # "grid" | "list[i]"
    overrides: list[str]  # "key=value", in the order applied (after the sweep's `set`)
    raw: dict[str, Any]  # the recipe mapping after overrides, `name` set
    recipe: Recipe | None = None  # None when it did not validate
    error: str | None = None  # why it did not validate
    values: dict[str, Any] = field(default_factory=dict)  # key -> value of this point (grid/list keys only)

    @property
    def valid(self) -> bool:
        return self.recipe is not None

    @property
    def label(self) -> str:
        """How messages name the point: ``grid point 3 (stages.0.method=hqq, stages.0.bits=8)``."""
        what = f"grid point {self.index}" if self.source == "grid" else self.source
        return what + (f" ({', '.join(self.overrides)})" if self.overrides else "")


def yaml_value(value: Any) -> str:
    """A value as it would be written after ``--set key=`` (YAML, one line)."""
    if isinstance(value, str) and "=" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass  # not a plain YAML scalar: quoted below
    return json.dumps(value)  # JSON is YAML: mappings and lists stay on one line


def base_recipe(sweep: SweepConfig, sweep_path: Path) -> tuple[dict, Path]:
    """The base recipe mapping and the file its relative paths resolve against."""
    if isinstance(sweep.base, dict):
        return copy.deepcopy(sweep.base), sweep_path
    path = Path(sweep.base).expanduser()
    path = path if path.is_absolute() else sweep_path.parent / path
    if not path.exists():
        raise RecipeError(f"{sweep_path}: `base`: no recipe file {path}. Fix: a path relative to the sweep file "
                          "(e.g. ../quickstart.yaml), or an inline recipe mapping.")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with `name`, `model` and `stages`.")
    return raw, path


def expand(sweep: SweepConfig, sweep_path: str | Path, *, preflight: bool = True) -> list[Point]:
    """Every point of the sweep, named and validated (``load_recipe``, and ``preflight`` unless told not to).

    Raises RecipeError before anything runs for mistakes in the sweep file itself (a key that is not in the recipe,
    clashing names), for a ``list`` entry that does not validate, for a grid point that does not validate when
    ``on_invalid: fail``, and when no point validates. Grid points that do not validate come back with ``error``.
    """
    sweep_path = Path(sweep_path)
    base, origin = base_recipe(sweep, sweep_path)
    common = [f"{k}={yaml_value(v)}" for k, v in sweep.set_.items()]
    specs: list[tuple[str, dict[str, Any], str | None]] = []  # (source, key -> value, explicit name)
    if sweep.grid:
        keys = list(sweep.grid)
        for combo in itertools.product(*(sweep.grid[k] for k in keys)):
            specs.append(("grid", dict(zip(keys, combo)), None))
    for i, entry in enumerate(sweep.list_):
        specs.append((f"list[{i}]", {k: v for k, v in entry.items() if k != "name"}, entry.get("name")))
    varying = _varying_keys(specs)
    points = []
    for index, (source, values, explicit) in enumerate(specs):
        overrides = [f"{k}={yaml_value(v)}" for k, v in values.items()]
        raw = copy.deepcopy(base)
        point = Point(index=index, name="", source=source, overrides=overrides, raw=raw, values=values)
        for item in common + overrides:
            try:
                apply_override(raw, item)
            except RecipeError as e:
                raise RecipeError(f"{sweep_path}: {point.label}: {str(e).replace('--set ', '', 1)} "
                                  f"(in the base recipe {origin.name})") from None
        try:
            point.name = explicit or _name(sweep, point, varying, base)
        except RecipeError as e:
            raise RecipeError(f"{sweep_path}: {e}") from None
        raw["name"] = point.name
        points.append(point)
    _check_names(points, sweep_path)
    for point in points:
        _validate(point, origin, sweep_path, preflight)
    _check_outcome(points, sweep, sweep_path, origin)
    return points


def _validate(point: Point, origin: Path, sweep_path: Path, preflight: bool) -> None:
    from ..pipeline import preflight as check

    where = f"{sweep_path}: {point.label}"
    try:
        point.recipe = load_recipe(point.raw, origin=origin, where=where)
        if preflight:
            check(point.recipe)
    except LLMCompressError as e:
        point.recipe, point.error = None, _short(str(e), where, origin)


def _short(message: str, where: str, origin: Path) -> str:
    """The error without the point's prefix (the leaderboard shows the point already)."""
    for prefix in (f"{where}: ", f"{origin}: "):
        message = message.replace(prefix, "")
    return message


def _check_outcome(points: list[Point], sweep: SweepConfig, sweep_path: Path, origin: Path) -> None:
    bad = [p for p in points if not p.valid]
    hand_written = [p for p in bad if p.source != "grid"]
    fatal = {"skip": hand_written, "skip-all": [], "fail": bad}[sweep.on_invalid]
    if not fatal and len(bad) == len(points):
        fatal = bad
    if fatal:
        lines = [f"{sweep_path}: {p.label} -> recipe `{p.name}`: {p.error}" for p in fatal]
        if len(bad) == len(points):
            base = f"`{origin}`" if origin != sweep_path else "(inline)"
            lines.append(f"No recipe of the sweep validates: the base recipe {base} or a key common to all is wrong.")
        elif sweep.on_invalid == "fail":
            lines.append("Fix: correct these values, or set `on_invalid: skip` to run the rest and list these.")
        else:
            lines.append("Fix: correct these list entries (grid combinations that do not validate are skipped; "
                         "`on_invalid: skip-all` skips list entries too, e.g. CUDA-only methods on a CPU machine).")
        raise RecipeError("\n".join(lines))


def _varying_keys(specs: list[tuple[str, dict, str | None]]) -> list[str]:
    """Keys whose value differs between points, in first-seen order (what a default name shows)."""
    keys: list[str] = []
    for _, values, _ in specs:
        keys += [k for k in values if k not in keys]
    seen = {k: {json.dumps(v.get(k, "<unset>"), sort_keys=True, default=str) for _, v, _ in specs} for k in keys}
    return [k for k in keys if len(seen[k]) > 1] or keys


def _name(sweep: SweepConfig, point: Point, varying: list[str], base: dict) -> str:
    if sweep.naming:
        return slug(_render(sweep.naming, point))
    parts = [_slug_value(k, point.values[k]) for k in varying if k in point.values]
    return slug("-".join(p for p in parts if p)) or slug(str(base.get("name") or "run"))


def _render(template: str, point: Point) -> str:
    def lookup(m: re.Match) -> str:
        node: Any = point.raw
        for part in m.group(1).strip().split("."):
            if isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise RecipeError(f"naming `{template}`: {point.label} has no `{m.group(1)}`. Fix: name it in its "
                                  "`list` entry (`name: ...`), or use keys every recipe has.")
        return _slug_value("", node)

    return re.sub(r"\{([^{}]+)\}", lookup, template)


def _slug_value(key: str, value: Any) -> str:
    """``rtn`` -> rtn; bits 4 -> bits4; a stage mapping -> its method (or type) and its other scalar values."""
    leaf = key.rsplit(".", 1)[-1] if key else ""
    if isinstance(value, dict):
        head = value.get("method") or value.get("type") or ""
        rest = [_slug_value(k, v) for k, v in value.items() if k not in ("type", "method", "name")
                and not isinstance(v, (dict, list))]
        return "-".join(str(p) for p in [head, *rest] if p)
    if isinstance(value, list):
        return "-".join(_slug_value("", v) for v in value)
    if isinstance(value, bool):
        return leaf if value else f"no-{leaf}"
    if isinstance(value, (int, float)) or value is None:
        return f"{leaf}{value}"
    return str(value)


def slug(text: str) -> str:
    """A valid run name: letters, digits, ``_.-``; other characters become ``-``."""
    out = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", text)).strip("-.")
    return out if re.match(NAME_PATTERN, out) else f"r{out}"


def _check_names(points: list[Point], sweep_path: Path) -> None:
    by_name: dict[str, list[Point]] = {}
    for p in points:
        by_name.setdefault(p.name, []).append(p)
    clashes = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if clashes:
        lines = [f"{sweep_path}: recipe name `{n}` is given to " + " and ".join(p.label for p in ps)
                 for n, ps in clashes.items()]
        lines.append("Fix: use a `naming:` template that includes the keys that differ, or give list entries a "
                     "`name:` (names must be unique: each recipe gets its own run folder).")
        raise RecipeError("\n".join(lines))
