"""The train loop: AdamW, a transformers schedule, gradient accumulation and checkpointing, a progress bar with loss.

Plain and explicit on purpose (no HF Trainer): one optimizer step = ``grad_accum`` micro-batches of ``batch_size``
sequences; the loss shown is the mean over the step's micro-batches.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..context import RunContext
    from .data import TrainData
    from .config import LoraSettings


@dataclass
class Trained:
    """What training leaves: figures for result.json and metadata for every saved folder."""

    data: dict[str, Any]
    meta: dict[str, Any]
    refit: Any = None  # lora.refit.Refit: the re-fitted base the adapter trained on (`qat: {refit: gptq}`)


def train_adapter(cfg: "LoraSettings", ctx: "RunContext") -> Trained:
    """Load a fresh copy of the current model, wrap it with LoRA, train it, save the adapter to <stage>/adapter.

    With ``accelerate.num_processes > 1`` or ``fsdp``, hands the training to torchrun processes instead (this process
    drops its cached models first, to leave them the memory) and returns rank 0's result.
    """
    import torch

    from . import OBJECTIVES
    from .distributed import in_worker, launch_training

    if not in_worker():
        cfg.accelerate.check_device(ctx.runtime.device, f"stages[{ctx.stage_index}] (lora)")
        if cfg.checkpoint_every:
            _find_checkpoint(cfg, ctx)
    if cfg.accelerate.launches and not in_worker():
        # The workers load their own copies: the ones cached here would only hold memory while they train.
        ctx.current.release()
        ctx.original.release()
        if ctx.runtime.device.startswith("cuda"):
            torch.cuda.empty_cache()
        saved = launch_training(cfg, ctx)  # torchrun processes run this function; rank 0's result comes back
        return Trained(data=saved["data"], meta=saved["meta"])
    prep = prepare(cfg, ctx)
    model, data, teacher, seed, init_info, qat, refit = (prep.model, prep.data, prep.teacher, prep.seed,
                                                         prep.init_info, prep.qat, prep.refit)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    loss_fn = OBJECTIVES.get(cfg.objective)
    t, record = time.perf_counter(), {}
    try:
        losses, state_dict, main = train_loop_(model, data, loss_fn, cfg, ctx, teacher, seed, record)
    finally:
        if hasattr(teacher, "remove"):
            teacher.remove()  # the cached logits: as large as the data x vocabulary, never needed again
    train_seconds = time.perf_counter() - t
    qat_info = _qat_info(qat, len(losses), refit) if qat is not None else None

    adapter_dir = ctx.stage_dir / "adapter"
    from ..models.loading import storage_dtype_of
    from .init import save_adapter

    if main:  # with several processes, rank 0 writes the adapter
        save_adapter(model, adapter_dir, init_info, dtype=storage_dtype_of(ctx.original.path), state_dict=state_dict)
    adapter_bytes = sum(p.stat().st_size for p in adapter_dir.glob("*.safetensors")) if main else 0
    steps = len(losses)
    k = max(1, min(5, steps // 4))  # first/last: means of a few steps, one step's loss is noisy
    data_out = {
        "objective": cfg.objective,
        "init": cfg.init,
        "base": ctx.current.describe(),
        "base_size_bytes": ctx.current.size_bytes,
        "sequences": int(data.input_ids.shape[0]),
        "seq_len": int(data.input_ids.shape[1]),
        "train_tokens": int(data.attention_mask.sum()),
        "loss_tokens": int(data.loss_tokens),
        "steps": steps,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "loss_curve": losses,  # every optimizer step's loss, as logged (report: plots/lora-loss.png)
        "lr_curve": record["lr_curve"],
        "train_seconds": round(train_seconds, 3),
        "seconds_per_step": round(train_seconds / max(steps, 1), 3),
        "data_seconds": round(prep.data_seconds, 3),
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": adapter_bytes,
        "accelerate": cfg.accelerate.model_dump(exclude_none=True),
        **({"resumed_from_step": record["resumed_from_step"]} if record["resumed_from_step"] else {}),
        **{k2: v for k2, v in init_info.items() if not k2.startswith("_")},
        **({"qat": qat_info} if qat_info else {}),
        **({"data_notes": data.notes} if data.notes else {}),
    }
    meta = {"lora": {"objective": cfg.objective, "init": cfg.init, "r": cfg.r, "alpha": cfg.lora_alpha,
                     "target_modules": cfg.target_modules, "steps": steps, "data": cfg.data.model_dump(),
                     "base": ctx.current.describe(),
                     **({"qat": cfg.qat.model_dump()} if cfg.qat is not None else {})}}
    del model
    return Trained(data=data_out, meta=meta, refit=refit)


def _find_checkpoint(cfg: "LoraSettings", ctx: "RunContext") -> None:
    """Before training (this process, once): drop checkpoints that cannot be used; say when training resumes."""
    from .checkpoint import checkpoint_key, latest, tidy

    key = checkpoint_key(cfg, ctx)
    tidy(ctx.checkpoint_dir, key, ctx.log)
    found = latest(ctx.checkpoint_dir, key)
    if found is not None:
        ctx.log(f"lora: resuming from the checkpoint at step {found[1]['step']} ({found[0]})")


@dataclass
class Prepared:
    """The model ready to train: a fresh student (re-fitted, wrapped, initialized, in QAT mode as asked), its data."""

    model: Any
    tokenizer: Any
    teacher: Any
    seed: int
    data: "TrainData"
    data_seconds: float
    init_info: dict
    qat: Any = None  # lora.qat.QAT
    refit: Any = None  # lora.refit.Refit


def prepare(cfg: "LoraSettings", ctx: "RunContext") -> Prepared:
    """Student, data, re-fit (``qat.refit``), init, QAT mode (``qat``): everything before the train loop."""
    import torch

    from ..models.loading import load_model
    from . import INITS
    from .data import build_data
    from .teacher import TeacherLogits

    t = time.perf_counter()
    if cfg.objective == "distill":  # the teacher's logits go to disk before the student loads: one model at a time
        seed = _seed_student(cfg, ctx)
        teacher, tokenizer = ctx.load(ctx.original)
        with ctx.task(f"lora: {cfg.objective} data"):
            data = build_data(cfg, ctx, tokenizer, teacher)
        with ctx.task("lora: teacher logits", total=len(data)) as advance:
            if cfg.top_k is not None:  # top-k log-probs + the rest's mass (distill/topk.py)
                from ..distill.topk import TopKLogits

                teacher = TopKLogits.write(teacher_path(ctx).with_suffix(".topk"), teacher, data.input_ids,
                                           data.attention_mask, top_k=cfg.top_k, temperature=cfg.temperature,
                                           hidden=False, batch_size=cfg.batch_size, key="lora", progress=advance)
            else:
                teacher = TeacherLogits.write(teacher_path(ctx), teacher, data, cfg.batch_size, advance)
        ctx.original.release()
        model, tokenizer = load_model(ctx.current.path, ctx.runtime.device, ctx.runtime.dtype)
    else:
        model, tokenizer, teacher, seed = fresh_student(cfg, ctx)
        with ctx.task(f"lora: {cfg.objective} data"):
            data = build_data(cfg, ctx, tokenizer, teacher)
    data_seconds = time.perf_counter() - t
    refit = None
    if cfg.qat is not None and cfg.qat.refit:  # a better rounding of the base first (lora/refit.py)
        from .refit import refit_base

        refit = refit_base(model, data.input_ids, cfg, ctx)
        del model
        model = load_model(refit.base, ctx.runtime.device, ctx.runtime.dtype)[0]
    torch.manual_seed(seed)
    model, init_info = INITS.get(cfg.init)(model, cfg, ctx)
    qat = None
    if cfg.qat is not None:  # the forward computes with the weights `merge: requantize` will write (lora/qat.py)
        from .qat import enable_qat

        with ctx.task("lora: qat setup"):
            qat = enable_qat(model, cfg, ctx, source=refit.source if refit else None)
    return Prepared(model=model, tokenizer=tokenizer, teacher=teacher, seed=seed, data=data,
                    data_seconds=data_seconds, init_info=init_info, qat=qat, refit=refit)


def _qat_info(qat: Any, steps: int, refit: Any) -> dict:
    """What QAT cost and changed: seconds making fake-quantized weights, the share of 4-bit codes the merged model
    has that its base has not, and the re-fit of the base."""
    return {**qat.info, "quantize_seconds": round(qat.seconds, 3), "quantize_seconds_per_step":
            round(qat.seconds / max(steps, 1), 3), "codes_changed": qat.codes_changed(),
            **({"refit": {**refit.info, "base": str(refit.base), "source": str(refit.source)}} if refit else {})}


def fresh_student(cfg: "LoraSettings", ctx: "RunContext") -> tuple[Any, Any, Any, int]:
    """``(model, tokenizer or image processor, teacher or None, seed)``: a fresh copy of the current model to train
    (the in-memory one may be the original, the distill teacher, or shared with other stages), seeded."""
    from ..models.loading import load_model

    seed = _seed_student(cfg, ctx)
    ctx.current.release()
    model, tokenizer = load_model(ctx.current.path, ctx.runtime.device, ctx.runtime.dtype)
    teacher = ctx.original.load()[0] if cfg.objective == "distill" else None
    return model, tokenizer, teacher, seed


def _seed_student(cfg: "LoraSettings", ctx: "RunContext") -> int:
    """Refuse a base that already carries an adapter; seed torch with the stage's seed and return it."""
    import torch

    if ctx.current.meta.get("format") == "peft":
        raise RecipeError("the model here is already base + LoRA adapter (`merge: keep` in an earlier lora stage). "
                          "Fix: merge the earlier adapter (`requantize` or `dequantized`) before training another")
    seed = ctx.runtime.seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    return seed


def teacher_path(ctx: "RunContext") -> Path:
    """Where this process caches the teacher's logits (one file per training process)."""
    return ctx.stage_dir / f"teacher-logits-{os.environ.get('RANK', '0')}.bin"


def total_steps(cfg: "LoraSettings", n_sequences: int) -> int:
    """Optimizer steps: ``steps`` as given, else ``epochs`` (default 1) passes over the sequences."""
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil((cfg.epochs or 1.0) * n_sequences / per_step))


def train_loop_(model: Any, data: "TrainData", loss_fn: Any, cfg: "LoraSettings", ctx: "RunContext", teacher: Any,
                seed: int, record: dict | None = None) -> tuple[list[float], dict | None, bool]:
    """Train the trainable parameters of ``model`` in place through an ``Accelerator`` (``cfg.accelerate``).

    Returns the loss of every optimizer step (the mean over processes), the gathered state dict when the model is
    sharded (FSDP; else None: save the model itself), and whether this is the process that saves. ``record``, when
    given, receives ``lr_curve`` (the learning rate of every step) and ``resumed_from_step`` (0: from the start).
    With ``checkpoint_every`` it starts from the stage's last checkpoint, if one matches (lora/checkpoint.py);
    with ``trackers`` every step is logged to them (lora/tracking.py).
    """
    import torch
    from transformers import get_scheduler

    from .checkpoint import Checkpointer, checkpoint_key
    from .distributed import make_accelerator
    from .tracking import accelerator_kwargs, log_step, start_trackers

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("the adapter has no trainable parameters. Fix: check `target_modules`")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = total_steps(cfg, len(data))
    if cfg.gradient_checkpointing:
        # non-reentrant: works with a frozen base (the reentrant variant needs inputs that require grad)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=steps)
    acc = make_accelerator(cfg.accelerate, ctx.runtime.device, **accelerator_kwargs(cfg, ctx))
    wrapped, opt = acc.prepare(model, opt)  # one process: the same objects back (no wrapper, no device move)
    acc.register_for_checkpointing(sched)  # saved with the checkpoints (prepare would step it once per process)
    ckpt = Checkpointer(acc, wrapped, ctx.checkpoint_dir, checkpoint_key(cfg, ctx)) if cfg.checkpoint_every else None
    position = (ckpt.restore() if ckpt else None) or {"step": 0, "losses": [], "lrs": []}
    start, losses, lrs = position["step"], list(position["losses"]), list(position["lrs"])
    rank, world = acc.process_index, acc.num_processes
    # Every process draws the same seeded order and keeps every world-th micro-batch: its share, none twice.
    batches = itertools.islice(data.batches(cfg.batch_size, seed), rank, None, world)
    for _ in range(start * cfg.grad_accum):  # a resumed run: the micro-batches the checkpoint's steps used
        next(batches)
    start_trackers(acc, cfg, ctx)
    for i in range(start):  # a resumed run's trackers get the whole curve (the earlier steps from the checkpoint)
        log_step(acc, cfg, i + 1, losses[i], lrs[i])
    log_every, t0 = max(1, steps // 8), time.perf_counter()
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                ctx.task(f"lora {cfg.objective}", total=steps) as advance:
            advance(start)
            for step in range(start, steps):
                step_loss = _train_step(acc, wrapped, batches, loss_fn, cfg, teacher, step)
                lrs.append(sched.get_last_lr()[0])  # the rate this step used
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                log_step(acc, cfg, step + 1, step_loss, lrs[-1])
                advance(1, description=f"lora {cfg.objective}: step {step + 1}/{steps} loss {step_loss:.4f}")
                if (step + 1) % log_every == 0 or step + 1 == steps:  # a few lines in the log (the bar is transient)
                    ctx.log(f"lora {cfg.objective}: step {step + 1}/{steps} loss {step_loss:.4f} "
                            f"lr {sched.get_last_lr()[0]:.2e} ({time.perf_counter() - t0:.0f}s)")
                if ckpt and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                    ckpt.save(step + 1, {"losses": losses, "lrs": lrs})
    finally:
        if cfg.trackers:
            acc.end_training()
    if record is not None:
        record.update(lr_curve=lrs, resumed_from_step=start)
    state_dict = acc.get_state_dict(wrapped) if cfg.accelerate.fsdp is not None else None  # collective: all ranks
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return losses, state_dict, acc.is_main_process


def _train_step(acc: Any, wrapped: Any, batches: Any, loss_fn: Any, cfg: "LoraSettings", teacher: Any,
                step: int) -> float:
    """Forward and backward over one optimizer step's micro-batches, gradients clipped; the step's mean loss."""
    import torch

    step_loss = 0.0
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        # gradients are averaged across processes once per optimizer step, on the last micro-batch
        with acc.no_sync(wrapped) if micro < cfg.grad_accum - 1 else contextlib.nullcontext():
            loss = loss_fn(wrapped, batch, teacher=teacher, temperature=cfg.temperature)
            acc.backward(loss / cfg.grad_accum)
        step_loss += loss.item() / cfg.grad_accum
    if acc.num_processes > 1:
        step_loss = float(acc.reduce(torch.tensor(step_loss, device=acc.device), reduction="mean"))
    if not math.isfinite(step_loss):
        raise RecipeError(f"lora: the loss became {step_loss} at step {step + 1}. Fix: lower `lr` "
                          f"(now {cfg.lr}) or raise `warmup_steps`")
    if cfg.max_grad_norm is not None:
        acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
    return step_loss
