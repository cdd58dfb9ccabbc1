"""Layer selection by name: exact module names, last name parts (``lm_head``) or regexes over the full name."""

from __future__ import annotations

import re


def check_regexes(patterns: list[str]) -> list[str]:
    """Validator for ``skip:`` lists: every entry must compile as a regex."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"`{pattern}` is not a valid regex ({e}); escape special characters") from None
    return patterns


def matches_any(module_name: str, patterns: list[str]) -> bool:
    return any(
        module_name == p or module_name.split(".")[-1] == p or re.fullmatch(p, module_name) for p in patterns
    )
