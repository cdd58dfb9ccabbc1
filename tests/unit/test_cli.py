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
    ("name: r\nmodel: some-org/some-model\nstages: [{type: evaluate}]\n", "not in the local Hugging Face cache"),
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


def test_corrupt_config_json_exits_2_naming_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{bad")
    r = cli("validate", write(tmp_path, "name: r\nmodel: ./m\nstages: [{type: evaluate}]\n"))
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr
    assert f"config.json of `{tmp_path / 'm'}` is not valid JSON (line 1)" in r.stderr
    assert "Fix: re-save the model with save_pretrained" in r.stderr


def test_serve_refuses_a_port_in_use_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", tmp_path / "nothing-here", "--port", port)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--port {port} is already in use" in r.stderr and "Fix:" in r.stderr and "--port 0" in r.stderr


def test_serve_dtype_is_one_of_the_recipe_names(tmp_path):
    import typing

    from llmcompress.cli import Dtype
    from llmcompress.recipe import Recipe

    assert typing.get_args(Dtype) == typing.get_args(Recipe.model_fields["dtype"].annotation)
    r = cli("serve", tmp_path, "--port", "0", "--dtype", "fp32")
    assert r.returncode == 2 and "Invalid value for '--dtype'" in r.stderr and "Traceback" not in r.stderr


#: Recipes whose method needs a CUDA GPU: without one they must fail validation, clearly.
GPU_ONLY = {"smollm2-llmc-fp8.yaml"}


def test_sigterm_unwinds_the_command_so_its_servers_are_closed(tmp_path):
    # A run's vLLM servers are closed by `finally` blocks and VLLMServer's atexit hook; Python's default SIGTERM
    # skips both. The CLI's handler turns SIGTERM into SystemExit (exit 143) so they run.
    code = (
        "import atexit, os, signal, sys, time\n"
        "from llmcompress.cli import _exit_on_sigterm\n"
        "_exit_on_sigterm()\n"
        f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').close())\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "finally:\n"
        f"    open({str(tmp_path / 'finally')!r}, 'w').close()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 143 and "Traceback" not in r.stderr
    assert (tmp_path / "finally").exists() and (tmp_path / "atexit").exists()


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


def test_version():
    from importlib.metadata import version

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmcompress {version('llmcompress')}"


def test_schema_accepts_every_shipped_recipe_and_catches_what_validate_catches(tmp_path):
    """`llmcompress schema` is JSON Schema an editor can use: every shipped recipe passes it as written (string
    `model:` shorthand included), and a misspelled key or method fails it, as the recipe loader does."""
    import json

    import jsonschema
    import yaml

    r = cli("schema", "--output", tmp_path / "recipe.schema.json")
    assert r.returncode == 0, r.stderr
    schema = json.loads((tmp_path / "recipe.schema.json").read_text())
    assert json.loads(cli("schema").stdout) == schema
    validator = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    for f in sorted((ROOT / "recipes").glob("*.yaml")):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(f.read_text()))]
        assert not errors, f"{f.name}: {errors[:2]}"
    good = {"name": "r", "model": "tiny-random-llama", "stages": [{"type": "quantize", "method": "rtn", "bits": 4}]}
    assert validator.is_valid(good)
    for bad_stage in ({"type": "quantize", "method": "rtn", "bitz": 4}, {"type": "quantize", "method": "bnb-nf5"},
                      {"type": "evaluat"}):
        assert not validator.is_valid({**good, "stages": [bad_stage]}), bad_stage
    assert not validator.is_valid({**good, "modle": "x"})


def test_schema_to_a_path_it_cannot_write_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli("schema", "-o", tmp_path / "file" / "schema.json")
    assert r.returncode == 2 and "Fix:" in r.stderr and "Traceback" not in r.stderr


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
