"""Builtin text corpora (``builtin:<name>``): text every Python install has, so nothing needs a download.

pydoc: Python's reference documentation (``pydoc_data.topics``, PSF license), one document per topic, ~465k characters
(~120k SmolLM2 tokens). Calibration reads it as documents; perplexity, prompts and the tiny model's tokenizer read the
same documents joined.

pysource: the Python standard library's own source files (code, docstrings and comments; PSF license), one document
per file, the first 4M characters in sorted path order (~1.1M SmolLM2 tokens), without tests and without
``pydoc_data``: text in quantity on every Python install that is not the documentation ``builtin:pydoc`` holds (what
the distill recipes train on, so that both evaluated domains, Python's docs and Shakespeare, stay unseen).
"""

from __future__ import annotations

from typing import Callable

BUILTIN_PREFIX = "builtin:"


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


#: How much of the standard library's source ``builtin:pysource`` reads (the first files in sorted order).
PYSOURCE_CHARS = 4_000_000


def _stdlib_sources() -> list[str]:
    """The Python standard library's own modules as text (code, docstrings, comments), one document per file, in
    sorted path order up to ``PYSOURCE_CHARS`` characters; tests, IDLE, site-packages and ``pydoc_data`` (the text
    of ``builtin:pydoc``) left out."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "pydoc_data", "lib2to3",
            "__pycache__", "turtledemo", "ensurepip"}
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(text)
        total += len(text)
        if total >= PYSOURCE_CHARS:
            break
    return docs


#: ``builtin:<name>`` -> its documents.
BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {"pydoc": _pydoc_topics, "pysource": _stdlib_sources}


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
