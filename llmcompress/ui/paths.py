"""What a visitor may see of the server's files: only files inside a run's own folder (``run_file``), and paths
written relative to the runs folder, never the server's absolute one (``Redactor``).

A run folder is written by whoever ran the recipe, and its report.json names the files the app shows: a path there
(``files.markdown: /etc/passwd``, ``../../secret``, a symlink that leads out) must not show any file outside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def run_file(run_dir: Path, rel: object, suffixes: tuple[str, ...] = ()) -> tuple[Path | None, str | None]:
    """``(the file, None)`` when ``rel`` names a regular file inside ``run_dir`` (symlinks resolved), else
    ``(None, why)``: not a relative path, outside the run folder, not there, or not one of ``suffixes``."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        return None, f"`{rel!r}` is not a file name"
    if Path(rel).is_absolute():
        return None, f"`{rel}` is an absolute path; only files inside the run folder are shown"
    root = Path(run_dir).resolve()
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        return None, f"`{rel}` cannot be read"
    if not path.is_relative_to(root):
        return None, f"`{rel}` leads outside the run folder (`..` or a symlink); only files inside it are shown"
    if suffixes and path.suffix.lower() not in suffixes:
        return None, f"`{rel}` is not a {' or '.join(suffixes)} file"
    if not path.is_file():
        return None, f"`{rel}` is missing"
    return path, None


class Redactor:
    """Rewrites the runs folder's absolute path, wherever it appears in a text, relative to that folder:
    ``/srv/app/runs/tiny-rtn/01-quantize/model`` -> ``tiny-rtn/01-quantize/model`` (the run's name in the app)."""

    def __init__(self, runs_dir: Path):
        runs_dir = Path(runs_dir)
        forms = {str(runs_dir.absolute()), os.path.abspath(runs_dir), str(runs_dir.resolve())}
        forms = sorted((f.rstrip("/") for f in forms if f.rstrip("/")), key=len, reverse=True)  # "/" alone: none
        # a form followed by "/" (a path under it: drop the prefix) or by nothing path-like (the folder itself)
        alternatives = "|".join(map(re.escape, forms))
        self._pattern = re.compile(rf"(?<![\w.\-])({alternatives})(/+|(?![\w.\-]))") if forms else None

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: "" if m.group(2) else ".", text)
