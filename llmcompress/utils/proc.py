"""Child processes that die with their parent: a run killed with SIGKILL (the OOM killer, `kill -9`, a job scheduler
that gives up waiting) runs no ``finally`` block and no atexit hook, so a memory probe, a reload check or a vLLM server
it started would live on, re-parented to PID 1, holding memory and ports. Linux delivers a chosen signal to a child
when the thread that started it exits (``PR_SET_PDEATHSIG``); elsewhere this is a no-op and the callers' own clean-up
(process groups, atexit) is all there is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``/``run`` that makes the child receive ``sig`` when this process dies.

    None (no preexec_fn) off Linux, and off the main thread: the kernel signals the child when the *thread* that
    started it exits, and a worker thread may end long before the process does.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not import after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody would signal us
            os.kill(os.getpid(), sig)

    return preexec


def run_checked(cmd: list[str], what: str, fix: str, env: dict | None = None, tail: int = 12) -> None:
    """Run ``cmd`` to the end; on a non-zero exit raise LLMCompressError with ``what``, the output's last ``tail``
    lines and ``fix`` (the setup commands' installs and builds)."""
    import subprocess

    from ..errors import LLMCompressError

    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-tail:])
        shown = " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else "")
        raise LLMCompressError(f"{what}: `{shown}` failed (exit {proc.returncode}):\n{out}\nFix: {fix}")
