"""Imports that would change this process's environment, done so that they do not.

``tokenicer`` (a gptqmodel dependency, 0.x) runs ``os.environ.setdefault("HF_HOME", "/tmp/tokenicer_hf_home")`` (and
HF_HUB_CACHE, TRANSFORMERS_CACHE, HF_MODULES_CACHE) when imported. gptqmodel is imported by our gptq stage, but also
by peft's ``get_peft_model`` (its GPTQ dispatcher) and by transformers when it loads a GPTQ folder. After a lora
stage, every later hub download of the process and every process it starts (vLLM, lm-eval, torchrun workers) would
use a cache under /tmp instead of the user's: a model already cached looks missing offline, and downloads land in a
folder nobody knows about. Importing tokenicer here first, with the environment put back, makes later imports of it
no-ops.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def environ_kept() -> Iterator[None]:
    """Run the block, then put ``os.environ`` back as it was (variables added removed, changed ones restored)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def import_tokenicer_cleanly() -> None:
    """Import tokenicer (when installed and not yet imported) and undo the environment changes its import makes."""
    if "tokenicer" in sys.modules or importlib.util.find_spec("tokenicer") is None:
        return
    with environ_kept():
        try:
            import tokenicer  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken optional package is not this function's business
            pass
