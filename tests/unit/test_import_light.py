"""`import llmcompress` and reading a recipe must not pull in heavy extras (STYLE rule 8)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "lm_eval", "gradio", "vllm", "bitsandbytes", "matplotlib", "peft"]


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_light():
    assert _imported_after("import llmcompress") == []


def test_loading_a_recipe_is_light():
    code = ("from llmcompress import load_recipe\n"
            "load_recipe({'name': 'x', 'model': 'smollm2-135m', 'stages': ["
            "{'type': 'quantize', 'method': 'bnb-nf4'}, {'type': 'evaluate'}, {'type': 'benchmark'}]})")
    assert _imported_after(code) == []
