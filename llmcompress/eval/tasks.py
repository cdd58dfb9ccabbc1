"""Local lm-eval tasks: the YAMLs in ``llmcompress/evals/`` (or ``$LLMCOMPRESS_EVALS``), found, fingerprinted and
rendered.

The shipped tasks are ordinary lm-eval tasks: their ``custom_dataset`` (``evals/loader.py``) reads the data files
relative to its own folder. A user's task folder may instead give ``dataset_path: json`` with ``data_files`` relative
to the YAML, which lm-eval (through ``datasets``) would read relative to the working directory; so runs index a
rendered copy: one small overlay YAML per task that includes the original by absolute path (so its ``!function``
helpers still resolve) and, for such tasks, makes ``data_files`` absolute.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from ..errors import RecipeError

EVALS_ENV = "LLMCOMPRESS_EVALS"


def evals_dir() -> Path:
    """The folder of local task YAMLs: ``$LLMCOMPRESS_EVALS``, else the shipped ``llmcompress/evals/``."""
    env = os.environ.get(EVALS_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise RecipeError(f"{EVALS_ENV}={env}: no such folder. Fix: point it to a folder of lm-eval task YAMLs.")
        return path
    from ..evals import path as shipped

    return shipped()


class _Function(str):
    """A ``!function module.name`` value: lm-eval imports ``module.py`` from the folder of the YAML that names it."""


class _TagTolerantLoader(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's tags as plain strings (we only look at names, data paths and helper modules)."""


_TagTolerantLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: (_Function if suffix == "function" else str)(loader.construct_scalar(node)))


def _read_yaml(path: Path) -> dict:
    try:
        cfg = yaml.load(path.read_text(), Loader=_TagTolerantLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e}). Fix: correct the task file.") from None
    return cfg if isinstance(cfg, dict) else {}


def _read_merged(path: Path, depth: int = 0) -> dict:
    """A task YAML with its ``include:`` files merged in (as lm-eval does: local keys win).

    ``!function`` values become the path of the helper module they name (resolved against the folder of their file).
    """
    cfg = _functions_as_paths(_read_yaml(path), path.parent)
    includes = cfg.pop("include", None)
    if includes is None or depth > 8:
        return cfg
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        if inc_path.is_file():
            merged.update(_read_merged(inc_path, depth + 1))
    return {**merged, **cfg}


def _functions_as_paths(value: Any, folder: Path) -> Any:
    """``!function utils.keep`` in a YAML in ``folder`` -> ``folder/utils.py`` (as lm-eval's ``import_function``)."""
    if isinstance(value, _Function):
        return folder / (value.rsplit(".", 1)[0] + ".py")
    if isinstance(value, list):
        return [_functions_as_paths(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _functions_as_paths(v, folder) for k, v in value.items()}
    return value


def _task_yamls(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.yaml")):
        if not any(part.startswith((".", "__")) for part in path.relative_to(root).parts):
            yield path


def local_tasks(root: Path | None = None) -> dict[str, Path]:
    """Task (and group) names defined in the evals folder -> their YAML file."""
    root = root or evals_dir()
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for path in _task_yamls(root):
        cfg = _read_merged(path)
        name = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg.get("group")
        if isinstance(name, str):
            out[name] = path
    return out


def _absolute(value: Any, base: Path) -> Any:
    """Make the relative file paths in a ``data_files`` value (str | list | dict) absolute against ``base``."""
    if isinstance(value, str):
        return value if "://" in value or Path(value).is_absolute() else str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def _overlay(path: Path) -> dict:
    """The rendered YAML for one task file: include the original, with data paths (relative to its folder) absolute.

    A task with a ``custom_dataset`` function reads its data files itself (the shipped ones: relative to
    ``loader.py``), so its ``dataset_kwargs`` are left as they are.
    """
    cfg = _read_merged(path)
    out: dict[str, Any] = {"include": str(path)}
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs and "custom_dataset" not in cfg:
        out["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path.parent)}
    ds = cfg.get("dataset_path")
    if isinstance(ds, str) and not Path(ds).is_absolute() and (path.parent / ds).exists():
        out["dataset_path"] = str((path.parent / ds).resolve())  # a local dataset folder
    return out


def tasks_fingerprint(tasks: Sequence[str], root: Path | None = None) -> str:
    """Hash of the local task files, their data and their ``!function`` helper modules (so cached results go stale
    when the data is rebuilt or a loader changes)."""
    local = local_tasks(root)
    h = hashlib.sha256()
    for name in sorted(set(tasks) & set(local)):
        path = local[name]
        h.update(name.encode() + path.read_bytes())
        for data in [*_data_files(path), *_helper_modules(path)]:
            h.update(data.read_bytes() if data.is_file() else b"missing")
    return h.hexdigest()[:16]


def _helper_modules(path: Path) -> list[Path]:
    """The Python files the task's ``!function`` values load (its own and those of its includes)."""
    found, stack = set(), [_read_merged(path)]
    while stack:
        v = stack.pop()
        if isinstance(v, Path):
            found.add(v)
        elif isinstance(v, (list, dict)):
            stack += list(v.values()) if isinstance(v, dict) else v
    return sorted(found)


def _data_files(path: Path) -> list[Path]:
    """The task's local data files, relative paths taken against the YAML's folder (where both the overlay and the
    shipped ``loader.py`` resolve them)."""
    kwargs = _read_merged(path).get("dataset_kwargs")
    files = _absolute(kwargs.get("data_files"), path.parent) if isinstance(kwargs, dict) else None
    flat: list[str] = []
    stack = [files]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            flat.append(v)
        elif isinstance(v, list):
            stack += v
        elif isinstance(v, dict):
            stack += list(v.values())
    return [Path(f) for f in sorted(flat) if "://" not in f]


def render_include_dir(root: Path | None = None) -> Path:
    """Write overlay YAMLs for every local task into a cache folder keyed by their content; return the folder."""
    from ..utils.cache import cache_dir
    from ..utils.io import atomic_dir, stable_hash

    root = root or evals_dir()
    overlays = {name: _overlay(path) for name, path in local_tasks(root).items()}
    target = cache_dir("evals-rendered", stable_hash([str(root), overlays], 12))
    if target.is_dir():
        return target
    with atomic_dir(target, replace=False) as tmp:
        for name, overlay in overlays.items():
            safe = re.sub(r"[^\w.-]", "_", name)
            (tmp / f"{safe}.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return target


def local_task_names() -> list[str]:
    """Sorted names of the local tasks (for ``llmcompress ls``)."""
    return sorted(local_tasks())
