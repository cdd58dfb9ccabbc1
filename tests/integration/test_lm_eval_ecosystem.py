"""The shipped lm-eval tasks as others meet them, in fresh processes started from a folder that is not the repository:
lm-eval's own CLI with `--include_path`, and llmcompress installed from a wheel (not editable) into a new environment.
About 30 s each here (lm-eval's CLI indexes its own tasks; the wheel's environment imports torch and lm-eval)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from llmcompress import evals  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
#: Offline (the tasks' data is local), one thread: how CI runs, and a fair share of a small machine.
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    env.pop("PYTHONPATH", None)  # nothing but the interpreter's own environment decides what is imported
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_lm_evals_own_cli_runs_the_shipped_tasks_from_any_folder(tiny_model_dir, tmp_path):
    """`lm_eval run --include_path <shipped folder>`: the tasks' data is found beside them, not in the CWD, and the
    figures are those the evaluate stage gets on the same model."""
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "results"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
          f"pretrained={tiny_model_dir},dtype=float32", "--device", "cpu", "--include_path", evals.path(),
          "--tasks", "pydoc_cloze,pydoc_ppl", "--limit", "2", "--batch_size", "2", "--output_path", out], elsewhere)
    (path,) = out.rglob("results_*.json")
    results = json.loads(path.read_text())["results"]
    assert set(results) == {"pydoc_cloze", "pydoc_ppl"}

    from llmcompress.eval.harness import run_tasks
    from llmcompress.models.loading import load_model

    model, tok = load_model(tiny_model_dir, "cpu", "float32")
    ours = run_tasks(model, tok, ["pydoc_cloze", "pydoc_ppl"], limit=2, batch_size=2)
    assert results["pydoc_cloze"]["acc,none"] == ours["pydoc_cloze"]["acc"]
    assert results["pydoc_ppl"]["byte_perplexity,none"] == pytest.approx(ours["pydoc_ppl"]["byte_perplexity"], 1e-4)


CHECK = """
import json, sys
from pathlib import Path

import llmcompress
from llmcompress import evals, run_recipe
from llmcompress.eval.chat import prompts_path
from llmcompress.eval.tasks import evals_dir, local_tasks

run = Path(sys.argv[2])
report = run_recipe({"name": "wheel", "model": sys.argv[1], "threads": 1, "dtype": "float32", "stages": [
    {"type": "evaluate", "tasks": ["pydoc_cloze", "pydoc_ppl"], "limit": 2, "batch_size": 2, "perplexity": None,
     "chat": {"limit": 2}}]}, run, show_progress=False)
print(json.dumps({
    "file": llmcompress.__file__, "evals": str(evals.path()), "evals_dir": str(evals_dir()),
    "tasks": {name: str(path) for name, path in local_tasks().items()}, "prompts": str(prompts_path("builtin:chat")),
    "lm_eval_file": [str(p) for p in run.rglob("lm-eval-original.json")],
    "original": report["stages"][0]["data"]["original"],
}))
"""


def test_a_wheel_install_ships_the_tasks_and_the_chat_prompts(tiny_model_dir, tmp_path):
    """pip wheel -> a fresh venv (with the system's packages, whose llmcompress is the editable checkout: the venv's
    own copy must win) -> from another folder, the tasks and prompts come from the installed package and run."""
    src, dist, venv, elsewhere = (tmp_path / n for n in ("src", "dist", "venv", "elsewhere"))
    src.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "llmcompress", src / "llmcompress", ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src], elsewhere)
    (wheel,) = dist.glob("llmcompress-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("pydoc_cloze.yaml", "pydoc_ppl.yaml", "loader.py", "__main__.py", "data/pydoc_cloze.jsonl",
                 "data/pydoc_cloze_shots.jsonl", "data/pydoc_ppl.jsonl", "chat/default.jsonl"):
        assert f"llmcompress/evals/{name}" in names, name

    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], elsewhere)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "-q", wheel], elsewhere)
    shipped = Path(_run([python, "-m", "llmcompress.evals"], elsewhere).stdout.strip())
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], elsewhere)
                .stdout.strip())
    assert shipped == site / "llmcompress" / "evals"

    r = _run([python, "-c", textwrap.dedent(CHECK), tiny_model_dir, tmp_path / "run"], elsewhere)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["file"]) == site / "llmcompress" / "__init__.py"  # not the editable checkout
    assert Path(got["evals"]) == Path(got["evals_dir"]) == shipped
    assert got["tasks"] == {name: str(shipped / f"{name}.yaml") for name in ("pydoc_cloze", "pydoc_ppl")}
    assert Path(got["prompts"]) == shipped / "chat" / "default.jsonl"
    assert len(got["lm_eval_file"]) == 1
    original = got["original"]
    assert 0 <= original["pydoc_cloze"]["acc"] <= 1 and original["pydoc_ppl"]["byte_perplexity"] > 1
    assert original["chat"]["n"] == 2  # the shipped chat prompts, read from the installed package
