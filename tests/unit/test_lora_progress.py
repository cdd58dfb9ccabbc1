"""The lora stage's training record: the loss curve in the report (plots/lora-loss.png), TensorBoard through
accelerate's trackers, and checkpoints that let a killed run resume the stage where it stood.

One uninterrupted run is shared by the module; the resume test kills a real process half-way through the same recipe
and runs it again, which must give the same adapter.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")

from llmcompress.errors import LLMCompressError, RecipeError  # noqa: E402
from llmcompress.pipeline import run_recipe  # noqa: E402
from llmcompress.recipe import load_recipe  # noqa: E402

STEPS, EVERY, KILL_AT = 8, 3, 5  # checkpoints after steps 3 and 6; the first run is killed during step 5


def lora_recipe(**lora) -> dict:
    stage = {"type": "lora", "objective": "sft", "r": 4, "steps": STEPS, "batch_size": 2, "grad_accum": 2,
             "lr": 0.01, "dropout": 0.1, "data": {"source": "builtin:pydoc", "samples": 8, "seq_len": 32},
             "checkpoint_every": EVERY, "trackers": ["tensorboard"], **lora}
    return {"name": "ckpt", "model": "tiny-random-llama", "threads": 1, "dtype": "float32", "stages": [stage]}


def _run(recipe: dict, out: Path) -> tuple[dict, str]:
    """Run in this process; the report and what the run logged."""
    from rich.console import Console

    buf = io.StringIO()
    report = run_recipe(load_recipe(recipe), out, console=Console(file=buf, width=400), show_progress=False)
    return report, buf.getvalue()


def _tensorboard(stage_dir: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage_dir / "tracking" / "ckpt"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "01-lora" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The recipe run start to end, no interruption."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("straight") / "run"
    report, log = _run(lora_recipe(), out)
    return out, report, log


def test_the_report_draws_the_loss_the_training_logged(straight):
    import matplotlib.image

    out, report, log = straight
    data = report["stages"][0]["data"]
    saved = json.loads((out / "report.json").read_text())
    curve = saved["comparison"]["lora_loss"][0]
    assert curve["stage"] == "01-lora" and curve["steps"] == list(range(1, STEPS + 1))
    assert curve["loss"] == data["loss_curve"] and len(curve["loss"]) == STEPS
    assert curve["lr"] == data["lr_curve"] and curve["lr"][0] == pytest.approx(0.01)
    # the log lines print each step's loss to 4 decimals: the same numbers
    for step, loss in enumerate(curve["loss"], 1):
        assert f"step {step}/{STEPS} loss {loss:.4f}" in log
    png = out / "plots" / "lora-loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.01  # not blank
    assert "plots/lora-loss.png" in saved["files"]["plots"]
    assert "](plots/lora-loss.png)" in (out / "report.md").read_text()


def test_tensorboard_gets_every_step_and_the_stage_config(straight):
    out, report, _ = straight
    data = report["stages"][0]["data"]
    logged = _tensorboard(out / "01-lora")
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    assert [v for _, v in logged] == pytest.approx(data["loss_curve"], rel=1e-6)  # float32 in the event file
    assert [v for _, v in _tensorboard(out / "01-lora", "train/lr")] == pytest.approx(data["lr_curve"], rel=1e-6)
    hparams = next((out / "01-lora" / "tracking" / "ckpt").glob("*/hparams.yml")).read_text()
    assert "checkpoint_every: 3" in hparams and "data.samples: 8" in hparams
    assert not (out / "checkpoints").exists()  # removed once the stage finished


def _killed_run(out: Path, tmp_path: Path) -> None:
    """Run the recipe in a child process and SIGKILL it during step KILL_AT, after the checkpoint at step EVERY."""
    marker = tmp_path / "at-step"
    # The child stops (sleeps) when it logs step KILL_AT, so the kill lands at a known place: a real SIGKILL, from here.
    script = f"""
import time
import llmcompress.lora.tracking as t
from llmcompress.pipeline import run_recipe
from llmcompress.recipe import load_recipe
log_step = t.log_step
def stop_at(acc, cfg, step, loss, lr):
    log_step(acc, cfg, step, loss, lr)
    if step == {KILL_AT}:
        open({str(marker)!r}, "w").write(str(step))
        time.sleep(600)
t.log_step = stop_at
run_recipe(load_recipe({lora_recipe()!r}), {str(out)!r}, show_progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the step"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run folder of the recipe killed during step KILL_AT (tests copy it before running into it)."""
    tmp = tmp_path_factory.mktemp("killed")
    _killed_run(tmp / "run", tmp)
    return tmp / "run"


def test_a_killed_run_resumes_the_stage_from_its_last_checkpoint(straight, killed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    checkpoint = out / "checkpoints" / "01-lora" / f"step-{EVERY:06d}"
    assert not (out / "01-lora" / "result.json").exists()  # the stage did not finish
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]
    position = json.loads((checkpoint / "position.json").read_text())
    assert position["step"] == EVERY and len(position["losses"]) == EVERY
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {p.name for p in checkpoint.iterdir()}

    report, log = _run(lora_recipe(), out)  # the same command again
    assert f"lora: resuming from the checkpoint at step {EVERY}" in log
    assert f"step {EVERY}/{STEPS} loss" not in log and f"step {EVERY + 1}/{STEPS} loss" in log  # not from step 0
    data, ref = report["stages"][0]["data"], straight[1]["stages"][0]["data"]
    assert data["resumed_from_step"] == EVERY and "resumed_from_step" not in ref
    assert data["loss_curve"] == pytest.approx(ref["loss_curve"], rel=1e-6, abs=1e-7)
    assert data["lr_curve"] == pytest.approx(ref["lr_curve"])
    a, b = _adapter(out), _adapter(straight[0])
    assert a.keys() == b.keys() and any(b[k].abs().max() > 0 for k in b if "lora_B" in k)
    for k in a:  # adapter, AdamW moments, schedule, dropout RNG and data position all came back
        assert a[k].float().allclose(b[k].float(), rtol=1e-5, atol=1e-7), k
    assert not (out / "checkpoints").exists()
    # TensorBoard in the resumed run: the whole curve (the checkpoint's first steps logged again)
    assert [v for _, v in _tensorboard(out / "01-lora")] == pytest.approx(ref["loss_curve"], rel=1e-6)
    assert report["comparison"]["lora_loss"][0]["resumed_from_step"] == EVERY


def test_a_checkpoint_of_another_configuration_is_not_used(killed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    report, log = _run(lora_recipe(lr=0.005), out)  # another learning rate: another fingerprint
    assert "resuming" not in log and "made with another configuration" in log
    assert "resumed_from_step" not in report["stages"][0]["data"] and f"step 1/{STEPS} loss" in log
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("lora,expected", [
    ({"trackers": ["tensorbord"]}, "Did you mean `tensorboard`?"),
    ({"trackers": [], "logging_dir": "tb"}, "`logging_dir` applies to `trackers`"),
    ({"trackers": ["tensorboard", "tensorboard"]}, "listed twice"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"accelerate": {"fsdp": {}}}, "`checkpoint_every` saves the adapter from one process"),
])
def test_tracking_and_checkpoint_settings_are_checked_before_weights_load(tmp_path, lora, expected):
    with pytest.raises(RecipeError) as e:
        run_recipe(load_recipe(lora_recipe(**lora)), tmp_path / "r", show_progress=False)
    assert expected in str(e.value) and "stages[0] (lora)" in str(e.value)


def test_logging_dir_is_relative_to_the_recipe_file(tmp_path):
    from types import SimpleNamespace

    import yaml

    from llmcompress.lora.tracking import accelerator_kwargs, flat_config

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(lora_recipe(logging_dir="tb", project_name="p")))
    recipe = load_recipe(tmp_path / "r.yaml")
    ctx = SimpleNamespace(recipe=recipe, stage_dir=tmp_path / "runs" / "ckpt" / "01-lora")
    kwargs = accelerator_kwargs(recipe.stages[0], ctx)
    assert kwargs == {"log_with": ["tensorboard"], "project_dir": str(tmp_path / "tb")}
    flat = flat_config(recipe.stages[0].model_dump(mode="json"))
    assert flat["data.samples"] == 8 and flat["trackers"] == "tensorboard" and "seed" not in flat  # nulls left out
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    with pytest.raises(LLMCompressError) as e:
        run_recipe(load_recipe(lora_recipe()), tmp_path / "r", show_progress=False)
    assert "pip install -c constraints.txt 'llmcompress[tracking]'" in str(e.value)
    assert "stages[0] (lora)" in str(e.value)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    with pytest.raises(LLMCompressError, match="Fix: pip install wandb"):
        run_recipe(load_recipe(lora_recipe(trackers=["wandb"])), tmp_path / "r2", show_progress=False)


SITE = """
import os
if os.environ.get("LLMCOMPRESS_LORA_WORKER") == "1":  # torchrun's training processes only
    import time
    import llmcompress.lora.tracking as t

    log_step = t.log_step

    def stop_at(acc, cfg, step, loss, lr):
        log_step(acc, cfg, step, loss, lr)
        if step == {kill_at}:
            if os.environ.get("RANK") == "0":
                open({marker!r}, "w").write(str(step))
            time.sleep(600)

    t.log_step = stop_at
"""


def test_two_training_processes_resume_from_their_checkpoint_too(tmp_path):
    """torchrun (accelerate.num_processes: 2): each process saves its RNG states, both resume, same adapter."""
    import psutil

    recipe = lora_recipe(accelerate={"num_processes": 2}, batch_size=1)
    ref, _ = _run(recipe, tmp_path / "straight")
    # The killed run: the training processes (fresh interpreters) stop at step KILL_AT through a sitecustomize
    # that only this test puts on their path; then the run's own process is SIGKILLed, and its torchrun group ends.
    site, marker, out = tmp_path / "site", tmp_path / "at-step", tmp_path / "run"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE.format(kill_at=KILL_AT, marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    script = f"from llmcompress.pipeline import run_recipe\nfrom llmcompress.recipe import load_recipe\n" \
             f"run_recipe(load_recipe({recipe!r}), {str(out)!r}, show_progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the training processes never reached the step"
            time.sleep(0.2)
        workers = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    gone, alive = psutil.wait_procs(workers, timeout=30)  # torchrun passes the parent's death on to its workers
    assert not alive
    assert (out / "checkpoints" / "01-lora" / f"step-{EVERY:06d}" / "random_states_1.pkl").is_file()

    report, log = _run(recipe, out)
    assert f"lora: resuming from the checkpoint at step {EVERY}" in log
    data, want = report["stages"][0]["data"], ref["stages"][0]["data"]
    assert data["resumed_from_step"] == EVERY and data["accelerate"]["num_processes"] == 2
    assert data["loss_curve"] == pytest.approx(want["loss_curve"], rel=1e-6, abs=1e-7)
    a, b = _adapter(out), _adapter(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].float().allclose(b[k].float(), rtol=1e-5, atol=1e-7), k
    assert [v for _, v in _tensorboard(out / "01-lora")] == pytest.approx(want["loss_curve"], rel=1e-6)
    assert not (out / "checkpoints").exists()
