"""Fake engines for the app's tests (no model): they stream given words, optionally slowly."""

from __future__ import annotations

import time
from pathlib import Path


class SlowBackend:
    """A stand-in engine: streams ``words`` one every ``delay_s`` seconds (records whether it was closed early)."""

    name = "hf"

    def __init__(self, words: list[str], delay_s: float = 0.0):
        self.words, self.delay_s = words, delay_s
        self.closed_early = False
        self.calls: list[list[dict]] = []

    def chat(self, messages, max_new_tokens=256, **sampling):
        self.calls.append(messages)
        n = 0
        try:
            for word in self.words[:max_new_tokens]:
                time.sleep(self.delay_s)
                n += 1
                yield word
        finally:
            self.closed_early = n < min(len(self.words), max_new_tokens)

    def describe(self):
        return {"engine": "fake", "dtype": "float32"}


def fake_pool(backends: dict[str, SlowBackend], roles: dict[str, str] | None = None):
    """A ModelPool whose entries stream from fake backends (no model, no tokenizer limits)."""
    from llmcompress.context import Runtime
    from llmcompress.ui.pool import Engine, ModelPool, PoolEntry

    pool = ModelPool(Runtime(device="cpu", threads=1, dtype="float32", seed=0))
    for i, (key, backend) in enumerate(backends.items()):
        engine = Engine("hf", backend)
        engine._ready.set()
        role = (roles or {}).get(key, "original" if i == 0 else "compressed")
        pool.entries.append(PoolEntry(key=key, role=role, path=Path("/nonexistent") / key, run_dir=None,
                                      method=None, size_bytes=0, weights_bytes=None, peak_rss_bytes=None, load_s=0.0,
                                      tokenizer=None, engines={"hf": engine}, describe=backend.describe()))
    return pool
