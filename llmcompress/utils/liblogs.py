"""Keep the libraries' chatter out of the user's console and in the run folder.

transformers, torch, torchao, gptqmodel, llmcompressor and lm-eval each print warnings, banners and progress bars of
their own ("Failed to load ..._C_mxfp8.so", "Loading weights: 100%", FutureWarnings). During a run they go to
``<run>/logs/libraries.log`` instead — nothing is lost, and the console shows only llmcompress' own progress and
results. Errors still reach the user through llmcompress' own messages.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: Loggers that install their own stderr handler (so they would print even with a handler on the root logger).
_OWN_HANDLERS = ("transformers", "torch")


@contextmanager
def libraries_log_to(path: Path) -> Iterator[Path]:
    """Route Python warnings and library log records (WARNING and above) to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    import torch  # noqa: F401  (torch and transformers install their own stderr handlers on import: import first)

    _disable_hf_progress_bars()
    root = logging.getLogger()
    saved = [(name, logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in _OWN_HANDLERS]
    for name in _OWN_HANDLERS:
        lg = logging.getLogger(name)
        lg.handlers = [h for h in lg.handlers if not isinstance(h, logging.StreamHandler)]
        lg.propagate = True
    root.addHandler(handler)  # with a handler on the root, logging's last-resort stderr printer stays quiet
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings(), _tqdm_disabled():
            warnings.simplefilter("default")
            yield path
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
        for name, handlers, propagate in saved:
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
        _enable_hf_progress_bars()


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

    cls.__init__ = quiet
    try:
        yield
    finally:
        cls.__init__ = original
