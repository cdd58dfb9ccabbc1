"""This process's memory: resident size now, its peak since the last reset, and the machine's total.

Read from ``/proc`` on Linux (psutil and ``ru_maxrss`` elsewhere, where the peak cannot be reset). The peak is the
kernel's high-water mark ``VmHWM``; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current resident size,
so each stage of a run gets its own peak (``ru_maxrss`` cannot be reset). Child processes (the benchmark's memory
probe, a vLLM or llama.cpp server) are not counted: they report their own.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def collect() -> None:
    """Free what only reference cycles still hold (``gc.collect``), then :func:`trim`."""
    import gc

    gc.collect()
    trim()


#: glibc's ``mallopt`` parameter, and the upper bound of the threshold glibc otherwise moves by itself (64-bit).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20


@contextmanager
def heap_returned(threshold: int = 2**20) -> Iterator[None]:
    """Inside, every allocation of ``threshold`` bytes or more is a memory map of its own, handed back to the system
    the moment it is freed (glibc ``mallopt(M_MMAP_THRESHOLD)``; elsewhere a no-op); on the way out, :func:`collect`.

    For libraries that allocate and free many mid-sized tensors from several threads: glibc raises its threshold
    as large blocks are freed, after which tensors come from per-thread heaps that fragment. gptqmodel's quantize
    loop on a 360M model grew 0.62 -> 1.19 GiB resident that way (0.02 GiB of it live tensors); inside this, it
    stayed at 0.66-0.77 GiB. On exit the threshold is set to the bound glibc's own adjustment stops at.
    """
    libc = _libc()
    settable = libc is not None and hasattr(libc, "mallopt")
    if settable:
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
    try:
        yield
    finally:
        if settable:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        collect()


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, when it is glibc-like (``None`` elsewhere: macOS, Windows, musl without the calls)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
