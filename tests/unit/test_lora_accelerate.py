"""The lora stage's ``accelerate:`` block on CPU: two torchrun processes (gloo, data parallel) train the same adapter
as one process with their batches together; bf16 autocast; FSDP is refused on CPU before any weights load."""

from __future__ import annotations

import json

import pytest

from llmcompress.errors import RecipeError
from llmcompress.lora.distributed import AccelerateConfig, FSDPConfig, make_accelerator
from llmcompress.pipeline import run_recipe
from llmcompress.recipe import load_recipe


def lora_recipe(accelerate: dict, batch_size: int) -> dict:
    return {"name": "acc", "model": "tiny-random-llama", "threads": 1, "dtype": "float32",
            "stages": [{"type": "lora", "objective": "sft", "r": 4, "steps": 2, "batch_size": batch_size, "lr": 0.01,
                        "data": {"source": "builtin:pydoc", "samples": 8, "seq_len": 32}, "accelerate": accelerate}]}


def test_two_processes_train_the_adapter_one_process_trains_on_their_batches_together(tmp_path):
    from safetensors.torch import load_file

    run_recipe(load_recipe(lora_recipe({"num_processes": 2}, batch_size=2)), tmp_path / "ddp", show_progress=False)
    run_recipe(load_recipe(lora_recipe({}, batch_size=4)), tmp_path / "one", show_progress=False)
    stage = tmp_path / "ddp" / "01-lora"
    ddp = json.loads((stage / "result.json").read_text())["result"]["data"]
    one = json.loads((tmp_path / "one" / "01-lora" / "result.json").read_text())["result"]["data"]
    assert ddp["accelerate"]["num_processes"] == 2 and one["accelerate"]["num_processes"] == 1
    # Each rank takes every other batch of the same seeded order (2 + 2 sequences), and DDP averages the gradients:
    # the same update as one process on those 4 sequences.
    assert ddp["loss_curve"] == pytest.approx(one["loss_curve"], rel=1e-5) and ddp["steps"] == 2
    a = load_file(stage / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "01-lora" / "adapter" / "adapter_model.safetensors")
    # Summed in another order, a gradient entry near zero can come out a rounding apart, and Adam's g / (|g| + eps)
    # turns that into a visible step (one entry of 512 moved 6e-5 on a Zen 4 CPU): compare whole tensors.
    assert a.keys() == b.keys()
    assert all((a[k].float() - b[k].float()).norm() <= 1e-3 * b[k].float().norm() + 1e-8 for k in a)
    assert any(b[k].abs().max() > 0 for k in b if "lora_B" in k)  # it trained (B starts at zero)


def test_bf16_mixed_precision_autocasts_the_forward_on_cpu():
    import torch

    torch.manual_seed(0)
    x, layer = torch.randn(4, 64), torch.nn.Linear(64, 64)
    exact = layer(x)
    auto = make_accelerator(AccelerateConfig(mixed_precision="bf16"), "cpu").prepare(layer)(x)
    # accelerate hands fp32 back, computed in bf16: every value is a bf16 number, and not the fp32 result
    assert auto.dtype == torch.float32 and torch.equal(auto, auto.to(torch.bfloat16).float())
    assert not torch.equal(auto, exact) and torch.allclose(auto, exact, atol=0.05)
    plain = make_accelerator(AccelerateConfig(), "cpu").prepare(torch.nn.Linear(64, 64))  # a fresh state each time
    assert not torch.equal(plain(x), plain(x).to(torch.bfloat16).float())


def test_fsdp_settings_reach_the_accelerate_plugin():
    v2 = FSDPConfig(cpu_offload=True, transformer_layer_cls_to_wrap=["LlamaDecoderLayer"]).plugin()
    assert v2.fsdp_version == 2 and v2.reshard_after_forward is True
    assert v2.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    v1 = FSDPConfig(version=1, reshard_after_forward=False, auto_wrap_policy="size_based_wrap",
                    min_num_params=1000).plugin()
    assert v1.fsdp_version == 1 and v1.sharding_strategy.name == "SHARD_GRAD_OP" and v1.min_num_params == 1000


@pytest.mark.parametrize("accelerate,expected", [
    ({"fsdp": {}}, "accelerate has no CPU FSDP"),
    ({"mixed_precision": "fp16"}, "use bf16 on CPU"),
])
def test_what_cpu_cannot_do_is_refused_before_weights_load(tmp_path, accelerate, expected):
    with pytest.raises(RecipeError) as e:
        run_recipe(load_recipe(lora_recipe(accelerate, 2)), tmp_path / "r", show_progress=False)
    assert expected in str(e.value) and "stages[0] (lora)" in str(e.value)


@pytest.mark.parametrize("accelerate,expected", [
    ({"num_proceses": 2}, "Did you mean `num_processes`?"),
    ({"fsdp": {"version": 3}}, "`accelerate.fsdp.version`"),
    ({"fsdp": {"min_num_params": 10}}, "applies to `auto_wrap_policy: size_based_wrap`"),
])
def test_accelerate_block_is_validated_when_the_recipe_loads(accelerate, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(lora_recipe(accelerate, 2))
    assert expected in str(e.value)


def test_an_interrupted_launch_leaves_no_training_process_behind(tmp_path):
    """torchrun's workers are its children: an exception while waiting (Ctrl-C, a Ray cancel) ends the whole group."""
    import os
    import signal
    import sys
    import time

    from llmcompress.lora.distributed import _run_group

    pids = tmp_path / "pids"
    script = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
              f"open({str(pids)!r}, 'w').write(f'{{child.pid}}'); time.sleep(60)")

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits for its reaper, it runs nothing
        except FileNotFoundError:
            return False

    class Cancelled(Exception):
        pass

    def cancel(signum, frame):
        raise Cancelled

    old = signal.signal(signal.SIGALRM, cancel)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with open(tmp_path / "log", "w") as f, pytest.raises(Cancelled):
            _run_group([sys.executable, "-c", script], dict(os.environ), f, grace_s=2.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    child = int(pids.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
