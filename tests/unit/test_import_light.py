"""`import llmcompress` and reading a recipe must not pull in heavy extras (STYLE rule 8)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "transformers", "lm_eval", "gradio", "vllm", "bitsandbytes", "matplotlib", "peft", "gguf",
         "compressed_tensors", "llmcompressor", "loguru", "gptqmodel", "hqq", "torchao"]


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_light():
    assert _imported_after("import llmcompress") == []


@pytest.mark.parametrize("stages", [
    [{"type": "quantize", "method": "bnb-nf4"}, {"type": "evaluate"}, {"type": "benchmark"}],
    [{"type": "prune", "method": "wanda", "pattern": "2:4"}, {"type": "prune", "method": "magnitude", "sparsity": 0.5}],
    [{"type": "prune", "method": "sparsegpt", "pattern": "2:4"}, {"type": "quantize", "method": "llmc-gptq-w4a16"}],
    [{"type": "quantize", "method": "rtn"}, {"type": "export", "format": "compressed-tensors"},
     {"type": "export", "format": "gguf"}],
    [{"type": "quantize", "method": "bnb-nf4"},
     {"type": "lora", "objective": "distill", "init": "loftq", "merge": ["keep", "requantize"]}],
], ids=["quantize-evaluate-benchmark", "prune", "llmcompressor", "export", "lora"])
def test_loading_a_recipe_is_light(stages):
    recipe = {"name": "x", "model": "smollm2-135m", "stages": stages}
    code = f"from llmcompress import load_recipe\nload_recipe({recipe!r})"
    assert _imported_after(code) == []


def test_the_cli_and_the_app_building_blocks_import_light():
    """`llmcompress app` and the ui package load gradio and torch only when the app starts."""
    code = "import llmcompress.cli, llmcompress.ui, llmcompress.ui.config, llmcompress.ui.launch"
    assert _imported_after(code) == []
