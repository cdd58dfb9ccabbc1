"""One torchrun process of a lora stage's training (``python -m llmcompress.lora.worker JOB``, started by
``distributed.launch_training``): rebuild the stage's context from the job file, train, rank 0 writes the result."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .distributed import RESULT_FILE


def main(job_file: str) -> None:
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
    main(sys.argv[1])
