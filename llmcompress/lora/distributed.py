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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import RecipeError, RunCrashed
from ..utils.proc import die_with_parent

if TYPE_CHECKING:
    from ..context import RunContext
    from .stage import LoraStage
    from .train import Trained

#: Set in the processes ``torchrun`` starts for the training step (they train; they do not launch again).
CHILD_ENV = "LLMCOMPRESS_LORA_WORKER"
JOB_FILE, RESULT_FILE = "train-job.json", "train-result.json"


class FSDPConfig(BaseModel):
    """accelerate's ``FullyShardedDataParallelPlugin`` settings (CUDA only: accelerate has no CPU FSDP)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1, 2] = Field(2, description="FSDP2 (fully_shard, DTensor) or FSDP1.")
    auto_wrap_policy: Literal["transformer_based_wrap", "size_based_wrap", "no_wrap"] = Field(
        "transformer_based_wrap", description="What becomes one FSDP unit: each decoder layer (the model's "
        "`_no_split_modules`), modules over `min_num_params`, or the whole model.")
    transformer_layer_cls_to_wrap: list[str] | None = Field(None, description="Layer class names (default: the "
                                                            "model's own, e.g. LlamaDecoderLayer).")
    min_num_params: int | None = Field(None, ge=1, description="size_based_wrap: parameters per unit.")
    reshard_after_forward: bool = Field(True, description="Free gathered weights after forward (FULL_SHARD); false "
                                        "keeps them until backward (SHARD_GRAD_OP: faster, more memory).")
    cpu_offload: bool = Field(False, description="Keep parameters on CPU between uses (fits larger models, slower).")
    activation_checkpointing: bool = Field(False, description="Recompute activations per FSDP unit.")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        "FULL_STATE_DICT", description="How the adapter is gathered for saving (full: rank 0 writes a plain file).")

    @model_validator(mode="after")
    def _policy(self) -> "FSDPConfig":
        if self.auto_wrap_policy != "size_based_wrap" and self.min_num_params is not None:
            raise ValueError("`min_num_params` applies to `auto_wrap_policy: size_based_wrap`. Fix: remove it")
        return self

    def plugin(self) -> Any:
        """The accelerate plugin these settings describe."""
        from accelerate import FullyShardedDataParallelPlugin

        kwargs: dict[str, Any] = {
            "fsdp_version": self.version, "auto_wrap_policy": self.auto_wrap_policy,
            "cpu_offload": self.cpu_offload, "activation_checkpointing": self.activation_checkpointing,
            "state_dict_type": self.state_dict_type,
        }
        if self.version == 2:
            kwargs["reshard_after_forward"] = self.reshard_after_forward
        else:  # accelerate 1.15 fills FSDP1's `sharding_strategy` from a default that wins over reshard_after_forward
            kwargs["sharding_strategy"] = "FULL_SHARD" if self.reshard_after_forward else "SHARD_GRAD_OP"
            kwargs["use_orig_params"] = True  # frozen base + trainable adapter in one unit (FSDP1 needs it for that)
        if self.transformer_layer_cls_to_wrap:
            kwargs["transformer_cls_names_to_wrap"] = list(self.transformer_layer_cls_to_wrap)
        if self.min_num_params:
            kwargs["min_num_params"] = self.min_num_params
        return FullyShardedDataParallelPlugin(**kwargs)


class AccelerateConfig(BaseModel):
    """How the lora stage trains: precision, processes, sharding (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast the forward passes.")
    num_processes: int = Field(1, ge=1, description="Training processes on this machine (one per GPU).")
    fsdp: FSDPConfig | None = Field(None, description="Shard the model over the processes' GPUs (CUDA only).")
    main_process_port: int | None = Field(None, ge=1024, le=65535, description="torchrun rendezvous port "
                                          "(default: a free one).")

    @property
    def launches(self) -> bool:
        """Whether training needs processes of its own (torchrun)."""
        return self.num_processes > 1 or self.fsdp is not None

    def check_device(self, device: str, where: str = "lora") -> None:
        """What the hardware must offer (checked when the stage starts, before any weights load)."""
        if not device.startswith("cuda"):
            if self.fsdp is not None:
                raise RecipeError(f"{where}: `accelerate.fsdp` shards the model over GPUs, and this run is on "
                                  f"{device} (accelerate has no CPU FSDP). Fix: remove `fsdp` here; "
                                  "`num_processes: 2` trains data-parallel on CPU")
            if self.mixed_precision == "fp16":
                raise RecipeError(f"{where}: `accelerate.mixed_precision: fp16` needs a GPU. Fix: use bf16 on CPU")
            return
        import torch

        if torch.cuda.device_count() < self.num_processes:
            raise RecipeError(f"{where}: `accelerate.num_processes: {self.num_processes}` needs that many GPUs, "
                              f"{torch.cuda.device_count()} are visible. Fix: lower it (in a Ray sweep, set "
                              f"executor.num_gpus: {self.num_processes})")


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


def launch_training(cfg: "LoraStage", ctx: "RunContext") -> "Trained":
    """Run ``train_adapter`` under torchrun with ``cfg.accelerate.num_processes`` processes; return rank 0's result."""
    from ..serving.process import free_port
    from ..utils.io import atomic_write_json, read_json
    from .train import Trained

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
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "llmcompress.lora.distributed", str(job_file)]
    env = {**os.environ, CHILD_ENV: "1", "OMP_NUM_THREADS": str(ctx.runtime.threads)}
    log = ctx.stage_dir / "train-processes.log"
    ctx.log(f"lora: training in {acc.num_processes} process(es) with torchrun "
            f"({'FSDP' if acc.fsdp else 'data parallel'}, mixed precision {acc.mixed_precision}); log: {log}")
    with open(log, "w") as f:
        rc = _run_group(cmd, env, f)
    if rc != 0 or not result_file.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RunCrashed(f"lora: the training processes failed (exit {rc}); the end of {log}:\n{tail}")
    saved = read_json(result_file)
    return Trained(data=saved["data"], meta=saved["meta"])


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


def _worker_main(job_file: str) -> None:
    """One torchrun process: rebuild the stage's context from the job file, train, rank 0 writes the result."""
    from ..context import ModelHandle, RunContext, Runtime
    from ..recipe import load_recipe
    from ..utils.io import atomic_write_json, read_json
    from .train import train_adapter

    job = read_json(job_file)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if job["runtime"]["device"].startswith("cuda"):
        import torch

        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU (loaders and .to("cuda") use it)
    runtime = Runtime(**job["runtime"])
    runtime.apply()
    recipe = load_recipe(job["recipe"], origin=job["origin"])
    original = ModelHandle("original", Path(job["original"]), runtime)
    current = original if job["current"] == job["original"] else ModelHandle("compressed", Path(job["current"]),
                                                                             runtime)
    console = None
    if rank == 0:
        from rich.console import Console

        console = Console(stderr=True)
    ctx = RunContext(recipe=recipe, run_dir=Path(job["run_dir"]), runtime=runtime, original=original,
                     current=current, console=console, stage_index=job["stage_index"],
                     stage_dir=Path(job["stage_dir"]), fingerprint=job["fingerprint"])
    trained = train_adapter(recipe.stages[job["stage_index"]], ctx)
    if rank == 0:
        atomic_write_json(Path(job["stage_dir"]) / RESULT_FILE, {"data": trained.data, "meta": trained.meta})
    _leave_group()  # after a failure the process just exits: torchrun stops the others (a barrier could hang them)


def _leave_group() -> None:
    """Wait for the other processes, then close the process group before the interpreter exits.

    A gloo group left to the interpreter's exit can be torn down while its threads still run, and the process then
    aborts ("terminate called without an active exception", SIGABRT) after a training that succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker_main(sys.argv[1])
