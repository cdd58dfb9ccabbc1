"""Keep the libraries' chatter out of the user's console and in the run folder.

transformers, torch, torchao, gptqmodel, llmcompressor and lm-eval each print warnings, banners and progress bars of
their own ("Failed to load ..._C_mxfp8.so", "Loading weights: 100%", FutureWarnings). During a run they go to
``<run>/logs/libraries.log`` instead — nothing is lost, and the console shows only llmcompress' own progress and
results. Errors still reach the user through llmcompress' own messages.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: Loggers that install their own stderr handler (so they would print even with a handler on the root logger).
_OWN_HANDLERS = ("transformers", "torch")
#: The CLI's ``--log-level`` and ``--verbose``, as environment variables so that the processes a run starts (torchrun
#: workers, a local Ray sweep's tasks) log the same way.
LEVEL_ENV, ECHO_ENV = "LLMCOMPRESS_LOG_LEVEL", "LLMCOMPRESS_LOG_ECHO"
LEVELS = ("debug", "info", "warning", "error")
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


def set_log_level(level: str | None = None, echo: bool = False) -> None:
    """How runs log the libraries' records: ``level`` (default warning) for ``logs/libraries.log``; ``echo`` also
    prints them on stderr (``--verbose``, which lowers the default level to info)."""
    if level is not None:
        os.environ[LEVEL_ENV] = level.lower()
    elif echo and LEVEL_ENV not in os.environ:
        os.environ[LEVEL_ENV] = "info"
    if echo:
        os.environ[ECHO_ENV] = "1"


def log_level() -> int:
    """The level set by ``set_log_level`` (or ``$LLMCOMPRESS_LOG_LEVEL``); WARNING when unset or not a level name."""
    name = os.environ.get(LEVEL_ENV, "warning").strip().lower()
    return getattr(logging, name.upper()) if name in LEVELS else logging.WARNING


@contextmanager
def libraries_log_to(path: Path) -> Iterator[Path]:
    """Route Python warnings and library log records (WARNING and above, or ``log_level()``) to ``path`` while the
    block runs; with ``$LLMCOMPRESS_LOG_ECHO=1`` (``--verbose``) to stderr as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    level = log_level()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(_FORMAT)
    handlers = [handler]
    if os.environ.get(ECHO_ENV) == "1":
        echo = logging.StreamHandler(sys.stderr)
        echo.setLevel(level)
        echo.setFormatter(_FORMAT)
        handlers.append(echo)
    import torch  # noqa: F401  (torch and transformers install their own stderr handlers on import: import first)

    _disable_hf_progress_bars()
    root = logging.getLogger()
    saved_levels = (root.level, _hf_verbosity())
    root.setLevel(min(level, logging.WARNING))
    _set_hf_verbosity(min(level, logging.WARNING))
    saved = [(name, logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in _OWN_HANDLERS]
    for name in _OWN_HANDLERS:
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)]
        lg.propagate = True
    for h in handlers:
        root.addHandler(h)  # with a handler on the root, logging's last-resort stderr printer stays quiet
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings(), _tqdm_disabled():
            warnings.simplefilter("default")
            yield path
    finally:
        logging.captureWarnings(False)
        for h in handlers:
            root.removeHandler(h)
            h.close()
        for name, own, propagate in saved:
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = own, propagate
        root.setLevel(saved_levels[0])
        _set_hf_verbosity(saved_levels[1])
        _enable_hf_progress_bars()


def _hf_verbosity() -> int:
    from transformers.utils import logging as hf_logging

    return hf_logging.get_verbosity()


def _set_hf_verbosity(level: int) -> None:
    """transformers keeps its own logger level (WARNING): records below it never reach the handlers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)


def _disable_hf_progress_bars() -> None:
    """transformers' "Loading weights" / "Writing model shards" bars (tqdm on stderr)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _enable_hf_progress_bars() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()


@contextmanager
def _tqdm_disabled() -> Iterator[None]:
    """Other libraries' tqdm bars (compressed-tensors' "Decompressing model", lm-eval's): every tqdm made inside
    the block is disabled. tqdm reads TQDM_DISABLE only when it is imported, so its constructor is wrapped instead."""
    try:
        import tqdm.std
    except ImportError:
        yield
        return
    cls = tqdm.std.tqdm
    original = cls.__dict__["__init__"]  # a partialmethod (tqdm's env wrapper): bind it through the descriptor

    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True
        original.__get__(self, type(self))(*args, **kwargs)

    quiet._shown_init = original  # type: ignore[attr-defined]  (what `tqdm_shown` puts back for a while)
    cls.__init__ = quiet
    try:
        yield
    finally:
        cls.__init__ = original


@contextmanager
def tqdm_shown() -> Iterator[None]:
    """Inside a run's ``libraries_log_to``: let tqdm bars show for the block (a model download's progress; the
    user's HF_HUB_DISABLE_PROGRESS_BARS=1 still wins)."""
    import os

    import tqdm.std
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    cls = tqdm.std.tqdm
    current = cls.__dict__["__init__"]
    cls.__init__ = getattr(current, "_shown_init", current)
    hub_off = are_progress_bars_disabled() and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None
    if hub_off:  # transformers' disable_progress_bar() (libraries_log_to) switched huggingface_hub's off too
        enable_progress_bars()
    try:
        yield
    finally:
        cls.__init__ = current
        if hub_off:
            disable_progress_bars()
