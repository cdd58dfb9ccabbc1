"""Shared by the app tests: stop a gradio app launched with ``block=False`` without gradio's thread race."""

from __future__ import annotations

import asyncio


def close(demo) -> None:
    """``demo.close()``, with the server's stop event set on the server's own event loop first.

    gradio 6's ``Blocks.close`` sets ``app.stop_event`` (an ``asyncio.Event``) from the calling thread while the
    server's loop may be iterating its waiters (each open event stream waits on it): now and then that raises
    ``RuntimeError: deque mutated during iteration`` (seen in a full test run, 2026-12-06). Setting it on the loop
    that waits, then closing, is what the event allows; ``close`` then finds it set and does not touch the waiters.
    """
    event = getattr(getattr(demo, "app", None), "stop_event", None)
    loop = getattr(event, "_loop", None)  # bound by the first waiter; None if nothing ever waited
    if event is not None and loop is not None and loop.is_running():
        async def _set() -> None:
            event.set()

        asyncio.run_coroutine_threadsafe(_set(), loop).result(timeout=10)
    demo.close()
