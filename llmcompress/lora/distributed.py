"""The lora stage's ``accelerate:`` block: mixed precision, data-parallel processes and FSDP, through 🤗 Accelerate.

```yaml
- type: lora
  objective: distill
  accelerate:
    mixed_precision: bf16        # no | bf16 | fp16 (fp16: CUDA only)
    num_processes: 4             # > 1: training runs in that many processes (torchrun), one per GPU; gloo on CPU
    fsdp:                        # shard the model over the processes' GPUs (CUDA only): models larger than one GPU
      version: 2
      auto_wrap_policy: transformer_based_wrap
      cpu_offload: false
```

Every run of the train loop goes through an ``Accelerator`` built from this block (one process, no block: the same
arithmetic as plain torch). With ``num_processes > 1`` or ``fsdp`` the stage starts ``torchrun`` on this machine for
the training step only; each process trains on its share of the batches (``batch_size`` is per process), rank 0
saves the adapter, and the stage goes on in this process (merge, later stages). Multi-node training is out of scope:
in a Ray sweep a recipe's task requests the GPUs of one node (``executor.num_gpus``) and the stage uses them there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any


from ..errors import RunCrashed
from ..utils.proc import die_with_parent
from .config import AccelerateConfig, FSDPConfig  # noqa: F401 - their home before config.py

if TYPE_CHECKING:
    from ..context import RunContext
    from .config import LoraSettings

#: Set in the processes ``torchrun`` starts for the training step (they train; they do not launch again).
CHILD_ENV = "LLMCOMPRESS_LORA_WORKER"
JOB_FILE, RESULT_FILE = "train-job.json", "train-result.json"


def in_worker() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def make_accelerator(cfg: AccelerateConfig, device: str, **extra: Any) -> Any:
    """An ``Accelerator`` for one training loop. Models stay where they were loaded (``device_placement=False``).

    ``extra``: more ``Accelerator`` arguments (the trackers: ``log_with``, ``project_dir``; lora/tracking.py).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if not in_worker():
        # One process may train several lora stages (a sweep runs many recipes) with different settings, and
        # accelerate keeps them in process-wide singletons: start from a clean state (as accelerate's own tests do).
        AcceleratorState._reset_state()
        GradientState._reset_state()
    kwargs: dict[str, Any] = {"mixed_precision": cfg.mixed_precision, "cpu": not device.startswith("cuda"),
                              "device_placement": False}
    if cfg.fsdp is not None:
        kwargs["fsdp_plugin"] = cfg.fsdp.plugin()
    return Accelerator(**kwargs, **extra)


# ---------------------------------------------------------------------------------------------------------------------
# The training step in processes of its own


def launch_training(cfg: "LoraSettings", ctx: "RunContext") -> dict:
    """Run ``train_adapter`` under torchrun with ``cfg.accelerate.num_processes`` processes (lora/worker.py); return
    rank 0's result as it saved it: ``{"data": ..., "meta": ...}``."""
    from ..serving.process import free_port
    from ..utils.io import atomic_write_json, read_json
    acc = cfg.accelerate
    job = {"recipe": ctx.recipe.model_dump(mode="json", exclude_none=True),
           "origin": str(ctx.recipe.path) if ctx.recipe.path else None, "stage_index": ctx.stage_index,
           "run_dir": str(ctx.run_dir), "stage_dir": str(ctx.stage_dir), "fingerprint": ctx.fingerprint,
           "original": str(ctx.original.path),
           "current": str(ctx.current.path), "runtime": {"device": ctx.runtime.device, "threads": ctx.runtime.threads,
                                                         "dtype": ctx.runtime.dtype, "seed": ctx.runtime.seed}}
    job_file, result_file = ctx.stage_dir / JOB_FILE, ctx.stage_dir / RESULT_FILE
    atomic_write_json(job_file, job)
    result_file.unlink(missing_ok=True)
    port = acc.main_process_port or free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={acc.num_processes}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "llmcompress.lora.worker", str(job_file)]
    env = {**os.environ, CHILD_ENV: "1", "OMP_NUM_THREADS": str(ctx.runtime.threads)}
    log = ctx.stage_dir / "train-processes.log"
    ctx.log(f"lora: training in {acc.num_processes} process(es) with torchrun "
            f"({'FSDP' if acc.fsdp else 'data parallel'}, mixed precision {acc.mixed_precision}); log: {log}")
    with open(log, "w") as f:
        rc = _run_group(cmd, env, f)
    if rc != 0 or not result_file.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RunCrashed(f"lora: the training processes failed (exit {rc}); the end of {log}:\n{tail}")
    return read_json(result_file)


def _run_group(cmd: list[str], env: dict, out: Any, grace_s: float = 10.0) -> int:
    """Run ``cmd`` in a process group of its own and wait; its exit code.

    If the wait is interrupted (Ctrl-C, SIGTERM raised as an exception, a Ray cancel), the whole group (torchrun and
    the workers it started) gets SIGTERM, then SIGKILL after ``grace_s``, before the exception goes on: no training
    process outlives the stage.
    """
    import signal

    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent(signal.SIGTERM))  # torchrun passes it on
    try:
        return proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers
            proc.wait(grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        finally:  # what is left of the group (a stuck torchrun, workers it did not reap), even on a second Ctrl-C
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)  # reaped: no zombie left
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        raise
