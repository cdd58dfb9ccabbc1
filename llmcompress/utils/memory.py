"""This process's memory: resident size now, its peak since the last reset, and the machine's total.

Read from ``/proc`` on Linux (psutil and ``ru_maxrss`` elsewhere, where the peak cannot be reset). The peak is the
kernel's high-water mark ``VmHWM``; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current resident size,
so each stage of a run gets its own peak (``ru_maxrss`` cannot be reset). Child processes (the benchmark's memory
probe, a vLLM or llama.cpp server) are not counted: they report their own.
"""

from __future__ import annotations

import re
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> int:
    """Resident set size of this process now."""
    now = _status_kib("VmRSS")
    if now is None:
        import psutil

        now = psutil.Process().memory_info().rss
    return now


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since the last ``reset_peak()`` (elsewhere than
    Linux: since it started)."""
    peak = _status_kib("VmHWM")
    if peak is None:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
    return peak


def reset_peak() -> bool:
    """Start a new peak at the current resident size (True when the kernel allowed it). Also resets torch's CUDA peak
    when CUDA is already initialised."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cuda_peak_bytes() -> int | None:
    """torch's peak of allocated CUDA memory since the last reset (None without CUDA in use)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def machine_memory() -> dict[str, int] | None:
    """``{"total": bytes, "available": bytes}`` this process may use: the machine's (``/proc/meminfo``), or a
    container's memory limit when it is lower (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``); None where
    unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    out = {}
    for key, name in (("MemTotal", "total"), ("MemAvailable", "available")):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[name] = int(m.group(1)) * 1024
    limit = _cgroup_limit()
    if limit is not None and "total" in out and limit < out["total"]:
        out["total"] = limit
        out["available"] = min(out.get("available", limit), limit)
    return out if "total" in out else None


def _cgroup_limit() -> int | None:
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(f).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            return int(value)
    return None


def trim() -> None:
    """Hand memory that the C allocator keeps after frees back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). Without it, a model released between stages left ~1 GiB of freed heap resident on a 1.7B run."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


_libc = None
