"""The lora stage's FSDP path (accelerate's FullyShardedDataParallelPlugin under torchrun): CUDA only."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("version", [2, 1])
def test_lora_trains_sharded_with_fsdp(tmp_path, version):
    from llmcompress.pipeline import run_recipe
    from llmcompress.recipe import load_recipe

    n = min(2, torch.cuda.device_count())
    recipe = {"name": "fsdp", "model": "tiny-random-llama", "device": "cuda", "dtype": "bfloat16",
              "stages": [{"type": "lora", "objective": "sft", "r": 4, "steps": 2, "batch_size": 2, "lr": 0.01,
                          "data": {"source": "builtin:pydoc", "samples": 8, "seq_len": 32},
                          "accelerate": {"num_processes": n, "mixed_precision": "bf16",
                                         "fsdp": {"version": version}}}]}
    run_recipe(load_recipe(recipe), tmp_path / "run", show_progress=False)
    data = json.loads((tmp_path / "run" / "01-lora" / "result.json").read_text())["result"]["data"]
    assert data["steps"] == 2 and all(x == x for x in data["loss_curve"]) and data["adapter_bytes"] > 0
    assert data["accelerate"]["fsdp"]["version"] == version
