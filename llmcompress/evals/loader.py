"""lm-eval's ``custom_dataset`` for the tasks in this folder: their JSON-lines files, found beside this file.

A task YAML says ``custom_dataset: !function loader.local_json`` and keeps ``dataset_kwargs: {data_files: ...}``
relative to this folder, so lm-eval's own CLI runs it from any working directory (``datasets`` alone would read the
paths against the working directory). lm-eval imports this file by its path, in whatever environment runs lm-eval
(the vLLM one too): it imports nothing from llmcompress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def resolve(files: Any, base: Path = HERE) -> Any:
    """``data_files`` (str | list | dict of them) with relative paths made absolute against ``base``."""
    if isinstance(files, str):
        return files if "://" in files or Path(files).is_absolute() else str(base / files)
    if isinstance(files, list):
        return [resolve(f, base) for f in files]
    if isinstance(files, dict):
        return {split: resolve(f, base) for split, f in files.items()}
    return files


def local_json(data_files: Any = None, **ignored: Any):
    """A ``datasets.DatasetDict`` with a split per key of ``data_files`` (JSON lines, paths relative to this folder).

    lm-eval calls it with the task's ``metadata`` and ``dataset_kwargs`` as keyword arguments (and, from its CLI, the
    model arguments too): everything but ``data_files`` is ignored.
    """
    import datasets

    if not data_files:
        raise ValueError("loader.local_json needs `dataset_kwargs: {data_files: {test: data/<file>.jsonl}}` in the "
                         "task YAML. Fix: add it (paths relative to the folder of loader.py).")
    return datasets.load_dataset("json", data_files=resolve(data_files))
