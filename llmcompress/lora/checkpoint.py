"""Checkpoints inside a long lora stage (``checkpoint_every: N``): a run killed half-way resumes at the last one.

The stage's own folder is replaced when a stage runs again (pipeline: nothing half-written is trusted), so the
checkpoints live beside it, in ``ctx.checkpoint_dir`` (``<run folder>/checkpoints/<stage folder>/``; the pipeline
removes it once the stage has finished)::

    step-000040/
      model.safetensors              the adapter's trainable tensors (not the frozen base: accelerate's pre-hooks)
      optimizer.bin  custom_checkpoint_0.pkl  random_states_<rank>.pkl      accelerate's save_state: AdamW, the
                                                                           scheduler, every process's RNG states
      position.json                  {"key", "step", "losses", "lrs", "seconds"}: where training stood

A checkpoint is written to ``.step-NNNNNN.tmp`` and renamed when whole; the older one is removed after. It is used only
when its ``key`` matches the stage's (the run's stage fingerprint: model, dtype, seed, threads and every stage config up
to this one; plus the base's files), so a changed recipe or base never resumes from another configuration's state. The
data position is the step: the micro-batches come from a seeded order, and a resumed run skips the ones already used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_json, read_json, stable_hash

POSITION = "position.json"
_PREFIX = "step-"


def checkpoint_key(cfg: Any, ctx: Any) -> str:
    """What a checkpoint must match to be used: the stage's fingerprint (the pipeline's), its config, and the base
    it trains on (files, sizes, mtimes: an earlier stage that ran again wrote another base)."""
    return stable_hash([ctx.fingerprint, cfg.model_dump(mode="json"), str(ctx.current.path),
                        ctx.current.fingerprint()])


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:06d}"


def latest(root: Path, key: str) -> tuple[Path, dict] | None:
    """The newest whole checkpoint under ``root`` made with ``key``, with its position; None when there is none."""
    found = []
    for p in root.glob(f"{_PREFIX}*") if root.is_dir() else []:
        try:
            position = read_json(p / POSITION)
        except (OSError, ValueError):
            continue
        if isinstance(position, dict) and position.get("key") == key and isinstance(position.get("step"), int):
            found.append((position["step"], p, position))
    if not found:
        return None
    _, path, position = max(found, key=lambda x: x[0])
    return path, position


def tidy(root: Path, key: str, log: Any) -> None:
    """Before training (one process): remove half-written checkpoints and those of another configuration."""
    if not root.is_dir():
        return
    keep = latest(root, key)
    for p in sorted(root.iterdir()):
        if keep is not None and p == keep[0]:
            continue
        if p.name.startswith(_PREFIX) and (p / POSITION).is_file():
            log(f"lora: checkpoint {p} was made with another configuration (recipe, model or seed changed): "
                "not used, removed")
        shutil.rmtree(p, ignore_errors=True)


class Checkpointer:
    """Saves and restores one training loop's state through its ``Accelerator`` (every process calls each method)."""

    def __init__(self, acc: Any, model: Any, root: Path, key: str):
        self.acc, self.model, self.root, self.key = acc, model, root, key
        # accelerate would save and load the whole model (the frozen base too: GBs, and bnb's 4-bit layers do not
        # load back through load_state_dict): the pre-hooks put only the trainable tensors in its place.
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    def _trainable(self) -> dict[str, Any]:
        return {n: p for n, p in self.acc.unwrap_model(self.model).named_parameters() if p.requires_grad}

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        for i in range(len(weights)):
            weights[i] = {n: p.detach().to("cpu").contiguous() for n, p in self._trainable().items()}

    def _load_hook(self, models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        models.clear()  # loaded here instead
        saved = load_file(str(Path(input_dir) / "model.safetensors"))
        params = self._trainable()
        if saved.keys() != params.keys():
            missing = sorted(set(params) ^ set(saved))[:3]
            raise ValueError(f"checkpoint {input_dir} holds other adapter tensors than this model ({missing})")
        for name, p in params.items():
            p.data.copy_(saved[name].to(p.device, p.dtype))

    def restore(self) -> dict | None:
        """Load the newest checkpoint made with this key; its position (``step``, ``losses``, ...) or None."""
        found = latest(self.root, self.key)
        if found is None:
            return None
        path, position = found
        self.acc.load_state(str(path))
        return position

    def save(self, step: int, position: dict) -> Path:
        """Write the state after optimizer step ``step`` (1-based) atomically; remove the older checkpoints."""
        final = step_dir(self.root, step)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))  # each process writes its RNG states; the main one the rest
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            atomic_write_json(tmp / POSITION, {"key": self.key, "step": step, **position})
            _sync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            _sync_dir(self.root)
            for old in self.root.glob(f"{_PREFIX}*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final


def _sync_dir(path: Path) -> None:
    """fsync a folder's entries (a rename is durable only then); a no-op where folders cannot be opened."""
    import os

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
