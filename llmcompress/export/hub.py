"""Push to the Hugging Face hub: a run's exported model with its card and report, or a plain model folder.

``push_to_hub(target, repo_id)`` is what ``llmcompress push`` and the export stage's ``push_to_hub:`` call. It uses
huggingface_hub's ``HfApi`` (``create_repo(exist_ok=True)``, ``upload_folder``; its progress display stays on) and
reads ``HF_ENDPOINT`` / ``HF_TOKEN`` like every huggingface_hub call. Nothing local is written: the files to upload
are linked (or copied, where links fail) into a temporary folder, with the card rendered there for the repo.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import LLMCompressError

#: Files of a run folder that go beside the model (the card's "full report" and its plots).
RUN_FILES = ("report.json", "report.md")
PLOTS = "plots"
_LOGIN_FIX = "Fix: run `hf auth login`, set HF_TOKEN, or pass --token."


class PushToHubConfig(BaseModel):
    """``push_to_hub:`` of an export stage: push the export (card, report.json, report.md, plots/) once the run ends.

    ```yaml
    push_to_hub:
      repo_id: your-name/smollm2-rtn4   # created if missing (private unless `private: false`)
      private: true
      revision: null                    # a branch; created if missing (default: main)
      commit_message: null
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    repo_id: str = Field(..., description="Hub repo `owner/name` (created when missing).")
    private: bool = Field(True, description="Create the repo private (an existing repo keeps its visibility).")
    revision: str | None = Field(None, description="Branch to push to (created when missing); default main.")
    commit_message: str | None = Field(None, description="Commit message; default names the run.")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        problem = repo_id_problem(v)
        if problem:
            raise ValueError(problem)
        return v


def repo_id_problem(repo_id: str) -> str | None:
    """Why the hub would refuse ``repo_id`` (checked without the network), with the fix; None when it is fine."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"repo id `{repo_id}` is not valid ({e}). Fix: use `owner/name`, e.g. `your-name/smollm2-rtn4`."
    if "/" not in repo_id:
        return f"repo id `{repo_id}` names no owner. Fix: use `owner/name`, e.g. `your-name/{repo_id}`."
    return None


def check_repo_id(repo_id: str) -> None:
    problem = repo_id_problem(repo_id)
    if problem:
        raise LLMCompressError(f"push: {problem}")


def check_can_push(token: str | None = None) -> str:
    """The token to push with; raise naming the fix when none is set or the hub is switched off (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise LLMCompressError("push: HF_HUB_OFFLINE is set, so nothing may be uploaded. Fix: unset HF_HUB_OFFLINE "
                               "(and check the network) before pushing.")
    found = token or get_token()
    if not found:
        raise LLMCompressError(f"push: no Hugging Face token (none passed, no HF_TOKEN, not logged in). {_LOGIN_FIX}")
    return found


def push_to_hub(target: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, export_index: int | None = None,
                ) -> str:
    """Upload ``target`` (a finished run folder or a model folder) to the hub repo ``repo_id``; return the commit URL.

    A run folder uploads its export (export stage ``export_index``, default the last one; without one, the final
    model when transformers loads it as saved), the model card rendered for ``repo_id``, report.json, report.md and
    plots/. A model folder is uploaded as it is. Raises LLMCompressError (bad target, no token, hub errors).
    """
    check_repo_id(repo_id)
    files, card = plan_upload(Path(target).expanduser(), repo_id, export_index)
    token = check_can_push(token)
    with tempfile.TemporaryDirectory(prefix="llmcompress-push-") as tmp:
        staged = _stage(Path(tmp), files, card)
        return _upload(staged, repo_id, private=private, revision=revision, token=token,
                       commit_message=commit_message or f"Upload {Path(target).name} with llmcompress")


def plan_upload(target: Path, repo_id: str, export_index: int | None = None) -> tuple[dict[str, Path], str | None]:
    """What to upload: ``{path in repo: local file}`` and the card text (None: the folder's own README.md, if any)."""
    if (target / "manifest.json").is_file():
        return _plan_run(target, repo_id, export_index)
    if (target / "config.json").is_file() or any(target.glob("*.gguf")):
        return _folder_files(target), None
    if not target.exists():
        raise LLMCompressError(f"push: `{target}` does not exist. Fix: pass a finished run folder (runs/<name>) or a "
                               "model folder (save_pretrained).")
    raise LLMCompressError(f"push: `{target}` is neither a run folder (no manifest.json) nor a model folder (no "
                           "config.json or .gguf). Fix: pass runs/<name> of a finished run, or a model folder.")


def _plan_run(run_dir: Path, repo_id: str, export_index: int | None) -> tuple[dict[str, Path], str | None]:
    from ..report.io import load_report
    from .card import render_card

    report = load_report(run_dir)
    exports = [s for s in report.get("stages", []) if s.get("type") == "export"]
    if export_index is not None:
        exports = [s for s in exports if s.get("index") == export_index]
    if exports:
        data = dict(exports[-1].get("data") or {})
        folder = Path(data.get("path", ""))
        if not folder.is_dir():
            raise LLMCompressError(f"push: the export folder `{folder}` of run `{run_dir}` is gone. Fix: run the "
                                   "recipe again (the export stage is redone), or push a model folder.")
        data["load_code"] = str(data.get("load_code", "")).replace(str(folder), repo_id)  # load it from the hub
    else:
        folder, data = _final_model(run_dir), None
    files = {k: v for k, v in _folder_files(folder).items() if k != "README.md"}
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            files[name] = run_dir / name
    for plot in sorted((run_dir / PLOTS).glob("*")) if (run_dir / PLOTS).is_dir() else []:
        if plot.is_file():
            files[f"{PLOTS}/{plot.name}"] = plot
    data = data or _plain_export(folder, repo_id)
    return files, render_card(report, data, repo_id=repo_id)


def _final_model(run_dir: Path) -> Path:
    """The final model of a run without an export stage, when plain ``from_pretrained`` loads it as saved."""
    from ..models.loading import read_meta
    from ..runs import final_model

    folder = final_model(run_dir)
    if folder is None:
        raise LLMCompressError(f"push: run `{run_dir}` has no stage that produced a model. Fix: add a quantize, "
                               "prune, lora or export stage, or push a model folder.")
    fmt = read_meta(folder).get("format", "hf")
    if fmt not in ("hf", "compressed-tensors"):
        raise LLMCompressError(f"push: the final model of `{run_dir}` is saved in llmcompress's own `{fmt}` layout, "
                               "which plain `from_pretrained` cannot load from the hub. Fix: add `- type: export` "
                               "(format hf, compressed-tensors or gguf) to the recipe and run it again.")
    return folder


def _plain_export(folder: Path, repo_id: str) -> dict[str, Any]:
    """The export data a card needs for a model folder pushed without an export stage (transformers loads it)."""
    load_code = ("import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                 f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype=torch.bfloat16)\n'
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    return {"format": "hf", "consumer": "transformers AutoModelForCausalLM.from_pretrained",
            "library": "transformers", "path": str(folder), "load_code": load_code}


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` (sub-folders too: a LoRA `keep` folder holds its base), by path in the repo."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _stage(tmp: Path, files: dict[str, Path], card: str | None) -> Path:
    """Link every file into ``tmp`` (copy where links fail) and write the card there: the folder upload_folder sends."""
    import shutil

    root = tmp / "upload"
    for rel, src in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            dst.symlink_to(src.resolve())
        except OSError:
            shutil.copy2(src, dst)
    root.mkdir(parents=True, exist_ok=True)
    if card is not None:
        (root / "README.md").write_text(card, encoding="utf-8")
    return root


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, token: str,
            commit_message: str) -> str:
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    where = f"push to `{repo_id}` on {constants.ENDPOINT}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise LLMCompressError(f"{where}: the hub refused the token (HTTP {status}): it is invalid or cannot "
                                   f"write to `{repo_id.split('/')[0]}`. {_LOGIN_FIX} (a token with write "
                                   "access)") from None
        raise LLMCompressError(f"{where}: the hub answered HTTP {status}: {_first_line(e)}. Fix: check the repo id "
                               "and revision, then push again (files already uploaded are skipped).") from None
    except (httpx.HTTPError, OSError) as e:
        raise LLMCompressError(f"{where}: cannot reach the hub ({type(e).__name__}: {_first_line(e)}). Fix: check "
                               "the network, HF_ENDPOINT and HTTPS_PROXY, then push again.") from None
    except ValueError as e:  # e.g. the hub rejected the card's metadata
        raise LLMCompressError(f"{where}: {e}. Fix: correct it and push again.") from None
    return str(getattr(info, "commit_url", info))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def push_exports(run_dir: Path, report: dict, console: Any = None) -> list[str]:
    """Push every export stage of a finished run that has ``push_to_hub:``; return the commit URLs."""
    done = []
    for stage in report.get("stages", []):
        cfg = (stage.get("config") or {}).get("push_to_hub") if stage.get("type") == "export" else None
        if not cfg:
            continue
        push = PushToHubConfig(**cfg)
        try:
            url = push_to_hub(run_dir, push.repo_id, private=push.private, revision=push.revision,
                              commit_message=push.commit_message, export_index=stage.get("index"))
        except LLMCompressError as e:
            raise LLMCompressError(f"{e} (The run itself finished: `llmcompress push {run_dir} {push.repo_id}` "
                                   "pushes it again.)") from None
        if console is not None:
            console.log(f"pushed {stage.get('dir')} to {url}")
        done.append(url)
    return done
