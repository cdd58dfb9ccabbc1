"""One registry type for stages, methods and builtin models: names written once, lazy entries, did-you-mean errors."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import RecipeError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """' Did you mean `x`?' when a close choice exists, else ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean `{close[0]}`?" if close else ""


class Registry(Generic[T]):
    """Maps kebab-case names to objects, or to lazy ``"module:attr"`` strings imported on first use.

    >>> QUANTIZERS = Registry("quantization method")
    >>> QUANTIZERS.register_lazy("rtn", "llmcompress.quant.rtn:RTNConfig")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self._add(name, obj)
            return obj

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        if ":" not in target:
            raise ValueError(f"lazy target must be 'module:attr', got {target!r}")
        self._add(name, target)

    def _add(self, name: str, obj: Any) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} `{name}` is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            choices = sorted(self._entries)
            raise RecipeError(
                f"unknown {self.kind} `{name}`.{did_you_mean(name, choices)} Choices: {', '.join(choices)}"
            )
        obj = self._entries[name]
        if isinstance(obj, str):
            module, attr = obj.split(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = obj
        return obj

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable value from YAML (a list where a name belongs) is no name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self.get(n)) for n in self.names()]
