"""Shared by the process-leak tests: the live processes of one session."""

from __future__ import annotations

import os


def in_session(sid: int) -> list:
    """Live processes of the session ``sid`` (a server's child calls setsid: sid = the child's pid)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out
