"""timm models: through transformers' ``TimmWrapperForImageClassification`` (hub ids ``timm/<name>``, or folders
it saved), which the adapter treats as any image classifier. timm itself imports torchvision (its layers and its
image processor do), so timm runs only where a torchvision matching the installed torch imports.

Measured here: ``timm`` 1.0.31 (``pip install --no-deps timm``) fails at import without torchvision
(``timm/layers/create_norm.py: from torchvision.ops.misc import FrozenBatchNorm2d``), and the PyPI torchvision 0.28.0
wheel is CUDA-built: beside the CPU torch 2.13 its ops library does not load (``operator torchvision::nms does not
exist``). So on this CPU machine timm models are refused up front with the fix, before any weights load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import RecipeError

TIMM_FIX = ("Fix: install timm with a torchvision built for your torch (`pip install timm torchvision` on a CUDA "
            "machine; the CPU torch needs torchvision from download.pytorch.org/whl/cpu), or use a transformers "
            "image classifier.")


def is_timm_config(conf: dict) -> bool:
    return conf.get("model_type") == "timm_wrapper" or any(
        a.startswith("TimmWrapper") for a in conf.get("architectures") or [])


def timm_problem() -> str | None:
    """Why timm cannot run here (None when it imports). Imports timm: call only for a timm model."""
    if importlib.util.find_spec("timm") is None:
        return "the `timm` package is not installed"
    try:
        import timm  # noqa: F401
        import torchvision.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError for a torch mismatch
        return f"timm does not import here ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})"
    return None


def check_timm(source: str, conf_path: Path | None, conf: dict | None = None) -> None:
    """Raise RecipeError (with the fix) when ``source`` is a timm model and timm cannot run here."""
    if conf is None and conf_path is not None and conf_path.is_file():
        from ..utils.io import read_config

        conf = read_config(conf_path)
    if not conf or not is_timm_config(conf):
        return
    problem = timm_problem()
    if problem:
        raise RecipeError(f"model: `{source}` is a timm model, and {problem}. {TIMM_FIX}")
