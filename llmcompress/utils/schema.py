"""Reading pydantic's error locations back in the user's terms: the key names as written in YAML (aliases, never
internal names like ``list_``), union tags dropped, and the nested block an unknown key was found in, so that a typo
in ``data: {sampels: 10}`` is matched against the keys of ``data`` rather than those of the stage around it."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, Tag

from ..registry import did_you_mean


def field_names(cls: type[BaseModel]) -> list[str]:
    """The keys a YAML mapping for ``cls`` may have (aliases where a field has one), sorted."""
    return sorted(f.alias or name for name, f in cls.model_fields.items())


def _field(cls: type[BaseModel], key: str) -> Any:
    for name, f in cls.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _members(annotation: Any, tag: str | None = None) -> list[tuple[str | None, type[BaseModel]]]:
    """The pydantic models an annotation can hold (through Optional, Union, list, Annotated), with their union tags."""
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *meta = typing.get_args(annotation)
        tag = next((m.tag for m in meta if isinstance(m, Tag)), tag)
        return _members(inner, tag)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(tag, annotation)]
    return [m for arg in typing.get_args(annotation) for m in _members(arg, tag)]


def _tag_of(member: tuple[str | None, type[BaseModel]]) -> Any:
    tag, cls = member
    if tag is not None:
        return tag
    type_field = cls.model_fields.get("type")
    return type_field.default if type_field is not None else None


def locate(cls: type[BaseModel], loc: list) -> tuple[type[BaseModel], list]:
    """``(model, path)``: the model the location ``loc`` ends in, and ``loc`` as the user wrote it (aliases, no tags).

    ``locate(LoraStage, ["data", "text"])`` -> ``(CalibrationConfig, ["data"])``.
    """
    current, shown = cls, []
    union: list | None = None  # the members of the union the previous key holds
    for i, part in enumerate(loc):
        if union is not None:
            tagged = [m for m in union if _tag_of(m) == part]
            current, union = (tagged or union)[0][1], None
            if tagged:
                continue
        if isinstance(part, int):
            shown.append(part)
            continue
        field = _field(current, str(part))
        if field is None:
            shown += loc[i:]
            break
        shown.append(field.alias or str(part))
        members = _members(field.annotation)
        if len(members) == 1:
            current = members[0][1]
        elif members:
            union = members
    if union:
        current = union[0][1]
    return current, shown


def unknown_key(prefix: str, cls: type[BaseModel], loc: list) -> str:
    """``prefix unknown key `x` in `a.b`. Did you mean `y`? Allowed keys: ...`` for an ``extra_forbidden`` error."""
    owner, inside = locate(cls, loc[:-1])
    name = str(loc[-1]) if loc else "?"
    allowed = field_names(owner)
    where = f" in `{'.'.join(map(str, inside))}`" if inside else ""
    return f"{prefix} unknown key `{name}`{where}.{did_you_mean(name, allowed)} Allowed keys: {', '.join(allowed)}."


def shown_path(cls: type[BaseModel], loc: list) -> str:
    """``loc`` as the user wrote it, dotted."""
    return ".".join(str(p) for p in locate(cls, loc)[1])

