"""What kind of model a recipe names, decided before any weights load (config.json, builtin names, the explicit
``kind:``), and whether its stages fit that kind (each family's ``problem``). No torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import RecipeError
from ..utils.io import read_config, read_json
from . import MODELS
from .family import DEFAULT, FAMILIES, Family, families, folder_kind, kind_of_config

if TYPE_CHECKING:
    from .spec import ModelSpec


def run_family(spec: "ModelSpec", path: str | Path) -> tuple[Family, str | None]:
    """``(family, task)`` of a run's model: the recipe's explicit ``kind``/``task`` (checked against config.json when
    the recipe loaded), else what the original model's folder says."""
    kind, task = folder_kind(path)
    if spec.kind != "auto":
        kind = spec.kind
    return FAMILIES.get(kind), spec.task or task


def check_kind(spec: "ModelSpec", stages: Sequence[Any], base_dir: Path, where: str,
               hub: bool = False) -> tuple[str | None, str | None]:
    """Raise RecipeError (every problem, one per line) when a recipe's stage does not fit its model's kind.

    ``hub=True`` (preflight): a hub model's config.json is read to learn its kind. Returns ``(kind, task)``.
    """
    try:
        kind, task = spec_kind(spec, base_dir)
        if kind is None and hub:
            kind, task = hub_kind(spec)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    if kind is None:
        return kind, task
    family = FAMILIES.get(kind)
    problems = []
    for i, stage in enumerate(stages):
        problem = family.problem(stage, task) or _after_structured(stage, list(stages[:i]))
        if problem:
            problems.append(f"{where}: stages[{i}] ({stage.kind}): {problem}")
    if problems:
        raise RecipeError("\n".join(problems))
    return kind, task


def _after_structured(stage: Any, earlier: list) -> str | None:
    """bnb and torchao load through ``from_pretrained``, which cannot give a structured-pruned layer its shape."""
    pruned = any(s.type == "prune" and s.method == "structured" for s in earlier)
    if pruned and stage.type == "quantize" and stage.method.startswith(("bnb-", "torchao-")):
        return (f"`{stage.method}` loads the model through `from_pretrained`, which cannot rebuild the layers a "
                "`structured` prune stage shrank. Fix: use rtn, hqq or dynamic-int8 after structured pruning.")
    if pruned and stage.type == "prune":
        return ("the model is already `structured`-pruned; a second prune stage on it is not supported. Fix: prune "
                "once (raise the structured stage's `sparsity` for a smaller model).")
    if pruned and stage.type == "export":
        return ("a `structured` prune stage gave each MLP its own width, which a transformers config cannot say, so "
                "no folder `from_pretrained` loads can hold it. Fix: remove the export stage (the run's model "
                "folders load with llmcompress.models.loading.load_model), or prune with `magnitude`.")
    return None


def spec_kind(spec: "ModelSpec", base_dir: Path) -> tuple[str | None, str | None]:
    """``(kind, task)`` the recipe's model has, from what can be read without the hub: the explicit ``kind:``, a
    builtin's family, a local folder's config.json. ``(None, None)`` = not known yet (a hub id without ``kind:``;
    the pipeline's preflight reads its config.json when the hub is reachable)."""
    detected: tuple[str | None, str | None] = (None, None)
    owner = next((f for f in families() if spec.source in f.builtins), None)
    if owner is not None:
        detected = (owner.name, owner.builtins[spec.source])
    else:
        path = Path(spec.source).expanduser()
        path = path if path.is_absolute() else base_dir / path  # relative to the recipe's folder
        if path.is_dir() and (path / "config.json").is_file():
            _check_config(spec.source, read_config(path / "config.json"))
            detected = folder_kind(path)
        elif spec.source in MODELS:
            detected = (DEFAULT, None)
    return _reconcile(spec, detected)


def hub_kind(spec: "ModelSpec") -> tuple[str | None, str | None]:
    """``(kind, task)`` of a hub model from its config.json (one small download); ``(None, None)`` when unreadable."""
    try:
        from huggingface_hub import hf_hub_download

        conf = read_json(Path(hf_hub_download(spec.source, "config.json", revision=spec.revision)))
    except Exception:  # noqa: BLE001 - no config.json (GGUF repos), or the hub failed: the loader says more later
        return _reconcile(spec, (None, None))
    _check_config(spec.source, conf)
    return _reconcile(spec, kind_of_config(conf))


def _check_config(source: str, conf: dict) -> None:
    for fam in families():
        fam.check_config(source, conf)


def _reconcile(spec: "ModelSpec", detected: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    """The explicit ``kind``/``task`` of ``model:`` checked against what the config says."""
    kind, task = detected
    if spec.kind != "auto":
        if kind is not None and kind != spec.kind:
            raise RecipeError(
                f"model: `kind: {spec.kind}`, but `{spec.source}` is a {_kind_words(kind, task)} model by its "
                f"config.json. Fix: set `kind: {kind}` (or `auto`), or point `source` at a {spec.kind} model."
            )
        kind = spec.kind
    if spec.task is not None:
        with_tasks = [f.name for f in families() if f.tasks]
        if kind is not None and kind not in with_tasks:
            raise RecipeError(f"model: `task: {spec.task}` applies to "
                              f"{' / '.join(f'`kind: {n}`' for n in with_tasks)} models, and `{spec.source}` is "
                              f"a {_kind_words(kind, None)} model. Fix: remove `task`.")
        if task is not None and task != spec.task:
            raise RecipeError(f"model: `task: {spec.task}`, but `{spec.source}` is an {task} model by its "
                              f"config.json. Fix: set `task: {task}` or remove it.")
        task = spec.task
    return kind, task


def _kind_words(kind: str | None, task: str | None) -> str:
    return FAMILIES.get(kind).words(task) if kind in FAMILIES else "unknown"
