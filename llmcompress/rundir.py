"""The run folder as something a user owns: checked before a run writes to it, locked while it does, cleared by
``--fresh`` only when a run made it (and then only what the run wrote), and each finished stage's outputs recorded so
that resume trusts a stage only while its files are still there, whole.

A folder is a run folder when it holds our ``manifest.json`` (written when a run starts). ``--fresh`` removes the
names a run writes (the stage folders ``NN-<stage type>``, the manifest, the resolved recipe, reports, plots, logs,
checkpoints) and nothing else; a folder that is not a run folder and is not empty is refused, with or without
``--fresh``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .context import CHECKPOINTS
from .errors import LLMCompressError
from .utils.io import atomic_write_json, read_json

MANIFEST = "manifest.json"
LOCK = ".llmcompress.lock"
#: Top-level names a run writes besides its stage folders (all that ``--fresh`` removes).
RUN_FILES = ("recipe.resolved.yaml", MANIFEST, "report.json", "report.md", "plots", "logs", CHECKPOINTS)
#: ``01-quantize``; the stage type is checked against the registry too.
STAGE_DIR = re.compile(r"^(\d{2,})-([a-z]+)$")
#: Temporary names of atomic writes (``.report.json.abc.tmp``) left by a killed run.
TMP_NAME = re.compile(r"^\..+\.tmp$")
FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------------
# What the folder is


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest as a dict with a ``stages`` list, or None when there is none or it is not ours."""
    try:
        data = read_json(Path(run_dir) / MANIFEST)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return None
    return data


@dataclass(frozen=True)
class FolderKind:
    """What kind of folder a command writes: how to tell one of ours, and the top-level names it writes."""

    what: str  # "run" | "sweep", as messages say it
    marker: str  # the file that makes a folder ours (when ``owned`` recognises its content)
    names: tuple[str, ...]  # top-level files and folders we write (besides locks and temporary files)
    owned: Callable[[Path], bool]  # True for a folder we made (its marker is ours, not a namesake's)
    stage_dirs: bool = False  # ``NN-<stage type>`` folders too


def _run_owned(path: Path) -> bool:
    """Our manifest (a mapping with `recipe` and a `stages` list); or, when it was damaged, a manifest beside the
    resolved recipe a run writes first. A web app's manifest.json is neither."""
    manifest = read_manifest(path)
    if manifest is not None:
        return isinstance(manifest.get("recipe"), str)
    return (path / MANIFEST).is_file() and (path / "recipe.resolved.yaml").is_file()


RUN = FolderKind("run", MANIFEST, RUN_FILES, _run_owned, stage_dirs=True)


def is_ours(path: Path, kind: FolderKind = RUN) -> bool:
    """True when ``path`` is a folder a run (or sweep) made."""
    return Path(path).is_dir() and kind.owned(Path(path))


def _ours(name: str, kind: FolderKind) -> bool:
    if name in kind.names or name == LOCK or TMP_NAME.match(name):
        return True
    m = STAGE_DIR.match(name) if kind.stage_dirs else None
    if not m:
        return False
    from .stage import STAGES

    return m.group(2) in STAGES


def check_output(out: Path, fresh: bool, kind: FolderKind = RUN) -> None:
    """Refuse, before anything is written, an output folder that is a file, lies under a file, cannot be written, or
    is someone else's (not empty, and neither its marker nor only names we write)."""
    out, what = Path(out), kind.what
    fix = f"Fix: pass --output with a new or empty folder (or an earlier {what} folder to resume it)."
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out else f"lies under `{parent}`, which is"
            raise LLMCompressError(f"output `{out}` {where} a file, not a folder. {fix}")
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                why = "on a read-only file system" if _read_only(parent) else "not writable (permission denied)"
                raise LLMCompressError(f"output `{out}`: `{parent}` is {why}. {fix}")
            break
    if out.is_dir() and not is_ours(out, kind):
        try:  # not ours: only an empty folder will do (a lock or temporary file of a killed first try aside)
            foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK and not TMP_NAME.match(p.name))
        except OSError as e:
            raise LLMCompressError(f"output `{out}` cannot be read ({e.strerror}). {fix}") from None
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            verb = "delete or overwrite files in" if fresh else "write into"
            raise LLMCompressError(
                f"output `{out}` is not a {what} folder (no {kind.marker}) and is not empty ({shown}): "
                f"llmcompress will not {verb} it. {fix}")


def check_owner(run_dir: Path, recipe_name: str, fresh: bool) -> None:
    """A run folder of another recipe is not resumed into (its stages would be replaced): refused unless ``fresh``."""
    manifest = read_manifest(run_dir)
    other = manifest.get("recipe") if manifest else None
    if other is not None and other != recipe_name and not fresh:
        raise LLMCompressError(
            f"output `{run_dir}` holds a run of recipe `{other}`, not `{recipe_name}`; running here would replace its "
            f"stages. Fix: pass another --output (the default is runs/{recipe_name}), or --fresh to replace it.")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def clear(out: Path, kind: FolderKind = RUN) -> list[str]:
    """``--fresh``: remove what a run (or sweep) wrote in ``out``, keep anything else; the names removed.

    Call with the folder locked, after ``check_output``.
    """
    removed = []
    for p in sorted(Path(out).iterdir()):
        if p.name == LOCK or not _ours(p.name, kind):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def start_manifest(run_dir: Path, recipe_name: str) -> None:
    """Mark the folder as a run folder before any stage writes to it (an existing manifest is kept for resume)."""
    if read_manifest(run_dir) is None:
        atomic_write_json(Path(run_dir) / MANIFEST, {"llmcompress": FORMAT, "recipe": recipe_name, "stages": []})


# ---------------------------------------------------------------------------------------------------------------------
# One run at a time


@contextmanager
def locked(run_dir: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None,
           what: str = "run") -> Iterator[None]:
    """Hold the folder's lock while the block runs. Another holder makes this raise LLMCompressError naming it (or,
    with ``wait``, block until it is done). The lock is the kernel's (``flock``): it goes with its process, so a run
    killed with SIGKILL leaves no stale lock behind, only a file whose owner line the next run overwrites."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(run_dir) / LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(path)
            if not wait:
                raise LLMCompressError(
                    f"`{run_dir}` is in use by another {what} ({owner}); two {what}s into one folder would delete "
                    f"each other's stages and share the CPU during benchmarks. Fix: wait for it to finish, pass "
                    f"--wait to start when it does, or pass another --output.") from None
            if on_wait:
                on_wait(owner)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"`{info['command']}`")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that holds its lock file"


# ---------------------------------------------------------------------------------------------------------------------
# What a stage wrote

_CHUNK = 64 * 1024
_SAMPLES = 8


def file_digest(path: Path, size: int) -> str:
    """A cheap content hash: ``_SAMPLES`` chunks of 64 KiB spread over the file (all of it up to 512 KiB), with its
    size. Catches truncation, a replaced file and most corruption without reading a 16 GB model again."""
    h = hashlib.blake2b(str(size).encode(), digest_size=12)
    with open(path, "rb") as f:
        if size <= _CHUNK * _SAMPLES:
            h.update(f.read())
        else:
            for i in range(_SAMPLES):
                f.seek((size - _CHUNK) * i // (_SAMPLES - 1))
                h.update(f.read(_CHUNK))
    return h.hexdigest()


def _files(root: Path) -> Iterator[Path]:
    """The files under ``root`` that a stage's record covers: not logs (a server a later stage reuses keeps writing
    its log) and not model cards (README.md: rewritten with the final figures whenever a run ends)."""
    if root.is_file():
        yield root
    elif root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(".log") and p.name != "README.md":
                yield p


def record_outputs(stage_dir: Path, artifacts: list[str], skip: str) -> dict[str, list]:
    """``{path: [size, digest]}`` of every file the stage wrote: in its folder (relative names, ``skip`` aside) and
    its artifacts elsewhere (absolute names)."""
    named = [(str(p.relative_to(stage_dir)), p) for p in _files(stage_dir) if p.name != skip]
    named += [(str(p), p) for a in artifacts for p in _files(Path(a))]
    return {name: _entry(p) for name, p in named}


def _entry(path: Path) -> list:
    size = path.stat().st_size
    return [size, file_digest(path, size)]


def outputs_problem(stage_dir: Path, recorded: Any) -> str | None:
    """Why the files a stage recorded no longer match (missing, another size, other content), or None."""
    if not isinstance(recorded, dict):
        return "its record of the files it wrote is unreadable"
    for name, entry in recorded.items():
        path = Path(name) if Path(name).is_absolute() else stage_dir / name
        try:
            size, digest = entry
            st = path.stat()
        except FileNotFoundError:
            return f"`{path}` is gone"
        except (OSError, TypeError, ValueError) as e:
            return f"`{path}` cannot be checked ({getattr(e, 'strerror', None) or e})"
        if not path.is_file():
            return f"`{path}` is no longer a file"
        if st.st_size != size:
            return f"`{path}` is {st.st_size:,} bytes, and the stage wrote {size:,}"
        if file_digest(path, st.st_size) != digest:
            return f"`{path}` changed since the stage wrote it"
    return None


def run_problem(run_dir: Path) -> str | None:
    """Why a finished run's stages can no longer be trusted (a stage's files missing or changed), or None. Reads
    each stage's ``result.json``; nothing is loaded."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return f"its {MANIFEST} is unreadable"
    for entry in manifest["stages"]:
        try:
            stage_dir = Path(run_dir) / entry["dir"]
            saved = read_json(stage_dir / "result.json")
            recorded = saved.get("outputs")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"stage {entry.get('dir') if isinstance(entry, dict) else entry!r}: its result.json is unreadable"
        problem = outputs_problem(stage_dir, recorded) if recorded is not None else None
        if problem:
            return f"stage {entry['dir']}: {problem}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Disk trouble, said in the user's terms

DISK_ERRNOS = {errno.ENOSPC: "full", errno.EDQUOT: "over its quota", errno.EROFS: "read-only",
               errno.EACCES: "not writable (permission denied)", errno.EPERM: "not writable (operation not permitted)",
               errno.EFBIG: "refusing a file that large"}
_DISK_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "file write failed")


def disk_error(exc: BaseException, run_dir: Path, needed_bytes: int | None = None) -> LLMCompressError | None:
    """An LLMCompressError naming the path, the problem and the fix when ``exc`` (or its cause) is a disk problem
    (full, quota, read-only, permission), else None. Libraries wrap ENOSPC in their own errors (safetensors, torch's
    zip writer), so their text counts too."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return _disk_message(e.errno, e.filename or run_dir, run_dir, needed_bytes)
        if any(t in str(e) for t in _DISK_TEXT):
            return _disk_message(errno.ENOSPC, run_dir, run_dir, needed_bytes)
        e = e.__cause__ or e.__context__
    return None


def _disk_message(code: int, path: Any, run_dir: Path, needed_bytes: int | None) -> LLMCompressError:
    from .report.metrics import fmt_bytes as human_bytes

    what = DISK_ERRNOS[code]
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(Path(path))
        need = f"; this run needs about {human_bytes(needed_bytes)} in all" if needed_bytes else ""
        return LLMCompressError(
            f"the disk is {what} while writing `{path}` ({human_bytes(free)} free there{need}). Nothing finished is "
            f"lost. Fix: free some space, or pass --output on a disk with more room, then run the same command "
            f"again: finished stages resume.")
    return LLMCompressError(
        f"`{path}` is {what}. Fix: pass --output with a folder you can write (finished stages of `{run_dir}` are "
        "kept), or fix its permissions.")


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (its nearest existing folder), 0 when none can be read."""
    for p in [path, *path.parents]:
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return 0
