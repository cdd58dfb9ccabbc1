"""Builtin text corpora (``builtin:<name>``): text every Python install has, so nothing needs a download.

pydoc: Python's reference documentation (``pydoc_data.topics``, PSF license), one document per topic, ~465k characters
(~120k SmolLM2 tokens). Calibration reads it as documents; perplexity, prompts and the tiny model's tokenizer read the
same documents joined.
"""

from __future__ import annotations

from typing import Callable

BUILTIN_PREFIX = "builtin:"


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


#: ``builtin:<name>`` -> its documents.
BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {"pydoc": _pydoc_topics}


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + name for name in BUILTIN_CORPORA]


def builtin_documents(source: str) -> list[str]:
    """The documents of ``builtin:<name>`` (or of ``<name>``)."""
    return BUILTIN_CORPORA[source.removeprefix(BUILTIN_PREFIX)]()


def builtin_text(source: str = "pydoc") -> str:
    """The documents of a builtin corpus joined by blank lines."""
    return "\n\n".join(builtin_documents(source))


def check_builtin(value: str, what: str = "corpus", also: tuple[str, ...] = ()) -> None:
    """Raise ValueError (with a did-you-mean) when ``value`` is ``builtin:<name>`` for no known name (``also``: more
    accepted names, e.g. calibration's ``builtin:mixed``, which is no corpus of documents)."""
    from ..registry import did_you_mean

    if value.removeprefix(BUILTIN_PREFIX) not in BUILTIN_CORPORA and value not in also:
        choices = list(also) + builtin_names()
        raise ValueError(f"unknown {what} `{value}`.{did_you_mean(value, choices)} Builtin: {', '.join(choices)}")
