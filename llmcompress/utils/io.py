"""Atomic writes and hashing: nothing half-written is ever trusted by a later run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file; ValueError for anything that is not JSON (nested too deep and binary files included)."""
    return loads_json(Path(path).read_bytes())


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that raises ValueError, never RecursionError (``[[[[...`` thousands deep) or UnicodeError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def read_config(path: Path) -> dict:
    """A model folder's JSON file (config.json, llmcompress.json) as a dict; LLMCompressError naming the file, the
    line and the fix when it is not a valid JSON object (``read_json`` raises a bare ValueError)."""
    from ..errors import LLMCompressError

    path = Path(path)
    fix = "Fix: re-save the model with save_pretrained, or point `model:` at another folder."
    try:
        data = loads_json(path.read_text())
    except json.JSONDecodeError as e:
        raise LLMCompressError(f"{path.name} of `{path.parent}` is not valid JSON (line {e.lineno}): {e.msg}. "
                               f"{fix}") from None
    except UnicodeDecodeError:
        raise LLMCompressError(f"{path.name} of `{path.parent}` is not text (not UTF-8). {fix}") from None
    except ValueError as e:
        raise LLMCompressError(f"{path.name} of `{path.parent}` is not valid JSON ({e}). {fix}") from None
    if not isinstance(data, dict):
        raise LLMCompressError(f"{path.name} of `{path.parent}` holds a JSON {type(data).__name__}, not an object "
                               f"({{...}}). {fix}")
    return data


def read_yaml(path: Path, where: str | None = None, what: str = "recipe") -> Any:
    """Parse a YAML file strictly (``yamlsafe``); RecipeError naming ``where`` (default: the path), the line and the
    fix for invalid YAML, duplicate keys, alias bombs, deep nesting, binary or non-UTF-8 files."""
    from ..errors import RecipeError
    from .yamlsafe import YAMLInputError, loads, read_text

    try:
        return loads(read_text(path, what))
    except YAMLInputError as e:
        raise RecipeError(yaml_error(e, where or str(path))) from None
    except OSError as e:
        raise RecipeError(f"{where or path}: cannot be read ({e.strerror or e}). Fix: check the path and its "
                          "permissions.") from None


def yaml_error(e: Exception, where: str) -> str:
    """``where: line N: message`` for a YAMLInputError (no line part when the whole file is to blame)."""
    line = getattr(e, "line", None)
    return f"{where}: line {line}: {e}" if line else f"{where}: {e}"


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for each non-blank line; RecipeError naming the line on invalid JSON."""
    from ..errors import RecipeError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}). Fix: save it as UTF-8 JSON lines.") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, loads_json(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}:{i}: not valid JSON ({e.msg}). Fix: one JSON object per line.") from None
        except ValueError as e:
            raise RecipeError(f"{path}:{i}: not valid JSON ({e}). Fix: one JSON object per line.") from None


@contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``final`` in one rename, on failure it is removed.

    With ``replace=False`` an existing ``final`` (say, built meanwhile by another process) is kept and the new one
    dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            if not replace:
                return
            shutil.rmtree(final)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_folder(target: Path, build: Callable[[Path], object], marker: str = "llmcompress.json") -> Path:
    """``target`` once it holds ``marker``; else ``build(tmp)`` fills a temporary folder that becomes ``target``
    (a folder another process finished first is kept)."""
    target = Path(target)
    if not (target / marker).is_file():
        with atomic_dir(target, replace=False) as tmp:
            build(tmp)
    return target


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) until the block ends: processes that share a folder
    (sweep workers on one machine; NFS v4 too) take turns. A no-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path`` (what a user downloads)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
