"""Finding the model a user means: a model folder, a run folder (its last model), or a builtin model name."""

from __future__ import annotations

from pathlib import Path

from .errors import LLMCompressError
from .utils.io import read_json


def final_model(run_dir: Path) -> Path | None:
    """The folder of the last model a finished run produced (None when no stage changed the model).

    Raises LLMCompressError naming the file and the fix when the manifest is unreadable."""
    from .rundir import MANIFEST, read_manifest

    manifest = read_manifest(run_dir)
    if manifest is None:
        raise LLMCompressError(
            f"`{run_dir / MANIFEST}` is unreadable (not the JSON object with a `stages` list a run writes). Fix: run "
            f"the recipe again into `{run_dir}` (finished stages resume and the manifest is rewritten), or point "
            "at the model folder inside it.")
    found = None
    for entry in manifest["stages"]:
        try:
            result = read_json(run_dir / entry["dir"] / "result.json")["result"]
            model_dir = result.get("model_dir")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(model_dir, str) and model_dir:
            found = run_dir / entry["dir"] / model_dir
    if found is not None and not found.resolve().is_relative_to(Path(run_dir).resolve()):
        raise LLMCompressError(f"`{run_dir}`: a stage's result.json points at `{found}`, outside the run folder. Fix: "
                               "run the recipe again into this folder (the stage is redone), or point at a model "
                               "folder.")
    return found


def model_of(target: str | Path, where: str) -> Path:
    """A model folder for ``target``: a model folder, a run folder (its final model) or a builtin model's name."""
    path = Path(target).expanduser()
    if (path / "manifest.json").is_file():
        model = final_model(path)
        if model is None:
            raise LLMCompressError(
                f"{where}: run folder `{path}` has no stage that produced a model. Fix: point at a run with a "
                "quantize, prune, lora or export stage, or at a model folder."
            )
        return model
    if (path / "config.json").is_file():
        from .models.source import check_folder

        check_folder(path)
        return path
    if not path.exists():
        from .models import MODELS

        if str(target) in MODELS:
            from .models.source import materialize
            from .models import resolve_source
            from .recipe import ModelSpec

            return materialize(resolve_source(ModelSpec(source=str(target)), Path.cwd()))
        raise LLMCompressError(
            f"{where}: `{target}` does not exist. Fix: pass a run folder (runs/<name>), a model folder with a "
            f"config.json, or a builtin model ({', '.join(MODELS.names())})."
        )
    raise LLMCompressError(
        f"{where}: `{path}` is neither a run folder (no manifest.json) nor a model folder (no config.json). "
        "Fix: pass runs/<name> of a finished run, or a folder written by save_pretrained."
    )
