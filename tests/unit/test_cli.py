"""The command line as a user meets it: exit codes, messages, never a traceback for a recipe mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd=ROOT, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmcompress.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def write(tmp_path, text: str) -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize("text,expected", [
    ("name: r\nmodel: tiny-random-llama\nstages:\n  - {type: quantize, method: bnb-nf5}\n", "Did you mean `bnb-nf4`?"),
    ("name: r\nmodel: tiny-random-llama\nstages:\n  - {type: quantize, method: rtn, bitz: 4}\n", "unknown key `bitz`"),
    ("name: r\nmodel: tiny-random-lama\nstages: [{type: evaluate}]\n", "Did you mean `tiny-random-llama`?"),
    ("name: r\nmodel: ./no/such/folder\nstages: [{type: evaluate}]\n", "not a builtin model, an existing folder"),
    ("name: r\nmodel: missing.gguf\nstages: [{type: evaluate}]\n", "does not exist"),
    ("name: r\nmodel: some-org/some-model\nstages: [{type: evaluate}]\n", "hub is not reachable"),
])
def test_bad_recipes_exit_2_with_one_clear_message(tmp_path, text, expected):
    f = write(tmp_path, text)
    for args in (("validate", f), ("run", f, "--output", tmp_path / "out")):
        r = cli(*args)
        assert r.returncode == 2, r.stderr
        assert expected in r.stderr and "Traceback" not in r.stderr + r.stdout
        assert str(f) in r.stderr  # the message names the file
    assert not (tmp_path / "out" / "01-quantize").exists()  # nothing heavy started


def test_missing_recipe_file(tmp_path):
    r = cli("run", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "no such recipe file" in r.stderr and "Traceback" not in r.stderr


def test_bad_override(tmp_path):
    r = cli("validate", ROOT / "recipes" / "tiny-smoke.yaml", "--set", "stages.0.bits=nine")
    assert r.returncode == 2 and "`bits`" in r.stderr and "Traceback" not in r.stderr


#: Recipes whose method needs a CUDA GPU: without one they must fail validation, clearly.
GPU_ONLY = {"smollm2-llmc-fp8.yaml"}


def test_every_shipped_recipe_validates():
    import torch

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for f in recipes:
        r = cli("validate", f)
        if f.name in GPU_ONLY and not torch.cuda.is_available():
            assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Fix:" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
            continue
        assert r.returncode == 0, f"{f}: {r.stderr}"
        assert "valid" in r.stdout


def test_ls_lists_registries():
    r = cli("ls")
    assert r.returncode == 0
    for name in ("smollm2-135m", "bnb-nf4", "rtn", "evaluate", "benchmark", "pydoc_ppl"):
        assert name in r.stdout


def test_run_tiny_smoke_end_to_end(tmp_path):
    r = cli("run", ROOT / "recipes" / "tiny-smoke.yaml", "--output", tmp_path / "run", "--quiet",
            "--set", "stages.1.tasks=[pydoc_cloze]")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "report.md").is_file()
    r2 = cli("run", ROOT / "recipes" / "tiny-smoke.yaml", "--output", tmp_path / "run", "--quiet",
             "--set", "stages.1.tasks=[pydoc_cloze]")
    assert r2.returncode == 0, r2.stderr[-3000:]
    import json

    stages = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    assert [s["resumed"] for s in stages] == [True, True, True]
