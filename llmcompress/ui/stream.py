"""Several replies streamed at once: one thread advances each model's stream, one generator yields all columns.

``stream_columns`` knows nothing of gradio or models: each source is a callable returning an iterator of text pieces
(one per generated token for the ``hf`` and ``vllm`` backends). Closing the generator (a stopped or cancelled chat)
stops every worker, which closes its stream, which stops that model's generation.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

Source = Callable[[], Iterator[str]]


@dataclass
class Column:
    """One model's reply so far, and when its tokens arrived."""

    key: str
    pieces: list[str] = field(default_factory=list)
    started: float | None = None  # perf_counter when its request was sent
    first: float | None = None  # ... when its first token arrived
    last: float | None = None  # ... when its latest token arrived
    done: bool = False
    error: str | None = None
    note: str | None = None  # "stopped", "time limit", why it did not run

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        return len(self.pieces)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None or self.started is None else self.first - self.started

    def tok_s(self, now: float | None = None) -> float | None:
        """Decode speed: tokens after the first per second since the first (live until the reply ends)."""
        if self.first is None or self.tokens < 2:
            return None
        end = self.last if self.done or now is None else now
        span = end - self.first
        return (self.tokens - 1) / span if span > 0 else None

    def elapsed_s(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.last if self.done and self.last else now) - self.started


_DONE = object()
GRACE_S = 15.0  # after the time limit, how long a stopped stream may take to end


def _work(col: Column, source: Source, out: queue.Queue, stop: threading.Event) -> None:
    """Advance one stream, posting ``(key, piece, time)``; end with ``(key, _DONE | exception, time)``."""
    stream = None
    try:
        out.put((col.key, None, time.perf_counter()))  # started
        stream = source()
        for piece in stream:
            if stop.is_set():
                break
            out.put((col.key, piece, time.perf_counter()))
        out.put((col.key, _DONE, time.perf_counter()))
    except Exception as e:  # noqa: BLE001 - shown in that model's column; the other columns go on
        out.put((col.key, e, time.perf_counter()))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # an unfinished generator stops its model's generation here


def stream_columns(sources: dict[str, Source], timeout_s: float, sequential: bool = False,
                   tick_s: float = 0.1, stop: threading.Event | None = None) -> Iterator[dict[str, Column]]:
    """Yield ``{key: Column}`` snapshots (the same objects, updated) while the sources stream, at most every
    ``tick_s``, and once more when all have ended. ``sequential``: one source at a time, in order (fair timing on a
    small CPU). A source still running after ``timeout_s`` (all together) is stopped and marked."""
    stop = stop or threading.Event()
    cols = {k: Column(k) for k in sources}
    out: queue.Queue = queue.Queue()
    pending = list(sources)
    running: dict[str, threading.Thread] = {}

    def launch(key: str) -> None:
        t = threading.Thread(target=_work, args=(cols[key], sources[key], out, stop), daemon=True,
                             name=f"stream-{key}")
        running[key] = t
        t.start()

    for key in (pending[:1] if sequential else pending):
        launch(key)
    pending = pending[1:] if sequential else []
    deadline = time.perf_counter() + timeout_s
    last_yield = 0.0
    try:
        while running or pending:
            try:
                key, item, t = out.get(timeout=tick_s)
            except queue.Empty:
                item = None
                key = None
            if key is not None:
                col = cols[key]
                if item is None:
                    col.started = t
                elif item is _DONE or isinstance(item, Exception):
                    col.done, col.last = True, col.last or t
                    if isinstance(item, Exception):
                        col.error = str(item) or type(item).__name__
                    running.pop(key, None)
                    if pending:
                        launch(pending.pop(0))
                else:
                    col.pieces.append(item)
                    col.first = col.first or t
                    col.last = t
            now = time.perf_counter()
            if now > deadline and not stop.is_set():
                stop.set()
                for col in cols.values():
                    if not col.done:
                        col.note = f"stopped at the time limit ({timeout_s:.0f} s)"
                for key in pending:
                    cols[key].done, cols[key].note = True, f"not started: time limit ({timeout_s:.0f} s) reached"
                pending = []
            if now > deadline + GRACE_S:  # a stream that does not even notice the stop (a hung server): leave it
                for key in list(running):
                    cols[key].done = True
                    running.pop(key)
            if now - last_yield >= tick_s:
                last_yield = now
                yield cols
        yield cols
    finally:
        stop.set()  # a closed (stopped, cancelled) chat: every worker ends at its next token


def first_divergence(reference: list[str], pieces: list[str]) -> int | None:
    """Index of the first token where ``pieces`` differs from ``reference`` (None when they are identical)."""
    for i, (a, b) in enumerate(zip(reference, pieces)):
        if a != b:
            return i
    return None if len(reference) == len(pieces) else min(len(reference), len(pieces))
