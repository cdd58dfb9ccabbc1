"""Opt-in experiment tracking for the lora stage (``trackers: [tensorboard]``) through accelerate's trackers.

The stage's ``Accelerator`` gets ``log_with=trackers`` and ``project_dir=logging_dir``; ``init_trackers`` receives the
stage config (flattened: ``data.samples``), each optimizer step logs ``train/loss`` and ``train/lr`` at its step
number, and ``end_training`` closes the trackers. TensorBoard writes to ``<logging_dir>/<project_name>/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MissingExtraError, RecipeError

TRACKING_DIR = "tracking"  # default logging_dir: <stage folder>/tracking
#: The extra that installs a tracker's package, where the project pins one (others: `pip install <name>`).
EXTRAS = {"tensorboard": "tracking"}
_PIP_NAMES = {"comet_ml": "comet-ml"}


def check_trackers(names: list[str]) -> None:
    """Each name is one of accelerate's trackers and its package is installed (checked before weights load; the
    pipeline adds the recipe and stage to the message)."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    from ..registry import did_you_mean

    known = sorted(LOGGER_TYPE_TO_CLASS)
    available = {getattr(t, "value", str(t)) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise RecipeError(f"unknown tracker `{name}` in `trackers`.{did_you_mean(name, known)} "
                              f"Fix: use accelerate's names: {', '.join(known)}")
        if name in available:
            continue
        if name in EXTRAS:
            raise MissingExtraError(name, EXTRAS[name], f"`trackers: [{name}]`")
        raise RecipeError(f"`trackers: [{name}]` needs the `{name}` package, which is not installed. "
                          f"Fix: pip install {_PIP_NAMES.get(name, name)}, or remove it from `trackers`")


def logging_dir(cfg: Any, ctx: Any) -> Path:
    """Where the trackers write: ``logging_dir`` (relative: to the recipe's folder), or ``<stage>/tracking``."""
    return ctx.recipe.resolve_path(cfg.logging_dir) if cfg.logging_dir else Path(ctx.stage_dir) / TRACKING_DIR


def accelerator_kwargs(cfg: Any, ctx: Any) -> dict:
    """``Accelerator`` arguments for the stage's trackers (none: {})."""
    if not cfg.trackers:
        return {}
    return {"log_with": list(cfg.trackers), "project_dir": str(logging_dir(cfg, ctx))}


def start_trackers(acc: Any, cfg: Any, ctx: Any) -> None:
    """``init_trackers`` with the run's project name and the stage config as hyperparameters."""
    if cfg.trackers:
        acc.init_trackers(cfg.project_name or ctx.recipe.name, config=flat_config(cfg.model_dump(mode="json")))


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"data": {"samples": 64}}`` -> ``{"data.samples": 64}``; lists as text, nulls left out (TensorBoard's hparams
    take numbers, text and booleans only)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{name}."))
        elif isinstance(v, (list, tuple)):
            out[name] = ",".join(str(x) for x in v)
        elif v is not None:
            out[name] = v
    return out


def log_step(acc: Any, cfg: Any, step: int, loss: float, lr: float) -> None:
    """One optimizer step's figures (``step`` is 1-based, as the log lines count)."""
    if cfg.trackers:
        acc.log({"train/loss": loss, "train/lr": lr}, step=step)
