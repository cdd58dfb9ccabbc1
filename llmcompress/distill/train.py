"""The distill train loop: AdamW on fp32 master weights, a budget in minutes, tokens or steps, a schedule over that
budget, held-out measurements every N steps, checkpoints through the lora stage's ``Checkpointer``.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences. With a minutes budget the schedule's
position is elapsed time / budget (so a slower machine decays the rate as fast, in fewer steps); the data is cycled
(a fresh shuffle each pass) when the budget outlasts it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..context import RunContext
    from ..lora.data import TrainData
    from .config import DistillSettings


@dataclass
class Position:
    """Where training stands (saved in each checkpoint's position.json)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    micro_batches: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)

    def progress(self, cfg: "DistillSettings") -> float:
        """The share of the budget used: steps, tokens or seconds."""
        b = cfg.budget
        done = {"steps": self.step, "tokens": self.tokens, "minutes": self.seconds / 60}[b.kind]
        return min(1.0, done / b.value)


def lr_at(cfg: "DistillSettings", pos: Position) -> float:
    """The rate of the next step: linear warm-up over ``warmup_steps``, then the schedule over the budget."""
    if pos.step < cfg.warmup_steps:
        return cfg.lr * (pos.step + 1) / cfg.warmup_steps
    p = pos.progress(cfg)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - p)
    return cfg.lr


def autocast(cfg: "DistillSettings", ctx: "RunContext") -> Any:
    """bf16 autocast of the forward (weights stay fp32), or a no-op context."""
    import torch

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.runtime.dtype == "bfloat16")
    device = "cuda" if ctx.runtime.device.startswith("cuda") else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)


def train_loop_(model: Any, data: "TrainData", teacher: Any, cfg: "DistillSettings", ctx: "RunContext", seed: int,
                held_out: Any = None, key: str = "") -> Position:
    """Train ``model``'s trainable parameters in place until the budget is spent; the final position."""
    import torch

    from ..lora.checkpoint import Checkpointer, tidy
    from ..lora.config import AccelerateConfig
    from ..lora.distributed import make_accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("distill: the student has no trainable parameters. Fix: check `target_modules`, or "
                          "`train_embeddings`")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    acc = make_accelerator(AccelerateConfig(), ctx.runtime.device)
    model.config.use_cache = False
    wrapped, opt = acc.prepare(model, opt)
    ckpt = None
    if cfg.checkpoint_every:
        root = ctx.checkpoint_dir / "train"
        tidy(root, key, ctx.log)
        ckpt = Checkpointer(acc, wrapped, root, key)
    saved = ckpt.restore() if ckpt else None
    pos = Position(**{k: v for k, v in saved.items() if k in Position.__dataclass_fields__}) if saved else Position()
    if saved:
        ctx.log(f"distill: resumed from the checkpoint at step {pos.step} ({pos.tokens:,} tokens)")
    batches = data.batches(cfg.batch_size, seed)
    for _ in range(pos.micro_batches):  # a resumed run: the micro-batches the checkpoint's steps used
        next(batches)
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    loss_kw = {"temperature": cfg.temperature, "hidden_weight": cfg.hidden_weight, "hidden_kind": cfg.hidden_loss}
    model.train()
    t0, start_seconds, total = time.perf_counter(), pos.seconds, cfg.budget.value
    if held_out is not None and not pos.held_out:
        pos.held_out.append(held_out.measure(model, pos, autocast(cfg, ctx)))
    with torch.inference_mode(False), torch.enable_grad(), ctx.task("distill", total=total) as advance:
        advance(_done(cfg, pos))
        while pos.progress(cfg) < 1:
            before, epoch = _done(cfg, pos), pos.micro_batches // per_epoch
            lr = lr_at(cfg, pos)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, tokens = _step(acc, wrapped, batches, teacher, cfg, ctx, loss_kw, pos.step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pos.step, pos.tokens = pos.step + 1, pos.tokens + tokens
            pos.micro_batches += cfg.grad_accum
            pos.seconds = start_seconds + time.perf_counter() - t0
            pos.losses.append(loss)
            pos.lrs.append(lr)
            if pos.micro_batches // per_epoch > epoch:
                ctx.log(f"distill: the data ran out after step {pos.step} (pass {epoch + 1} over its {len(data)} "
                        f"sequences): cycling over it again, freshly shuffled")
            if held_out is not None and (pos.step % held_out.every == 0 or pos.progress(cfg) >= 1):
                pos.held_out.append(held_out.measure(model, pos, autocast(cfg, ctx)))
                pos.seconds = start_seconds + time.perf_counter() - t0
            advance(_done(cfg, pos) - before, description=_describe(cfg, pos, loss))
            if ckpt and pos.step % cfg.checkpoint_every == 0 and pos.progress(cfg) < 1:
                ckpt.save(pos.step, _position(pos))
    model.eval()
    return pos


def _done(cfg: "DistillSettings", pos: Position) -> float:
    return {"steps": pos.step, "tokens": pos.tokens, "minutes": pos.seconds / 60}[cfg.budget.kind]


def _describe(cfg: "DistillSettings", pos: Position, loss: float) -> str:
    p = pos.progress(cfg)
    left = pos.seconds * (1 - p) / p if p > 0 else float("nan")
    speed = pos.tokens / max(pos.seconds, 1e-9)
    return f"distill: step {pos.step} loss {loss:.4f} {speed:.0f} tok/s, ~{left:.0f}s left"


def _position(pos: Position) -> dict:
    from dataclasses import asdict

    return asdict(pos)


def _step(acc: Any, wrapped: Any, batches: Any, teacher: Any, cfg: "DistillSettings", ctx: "RunContext",
          loss_kw: dict, step: int) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches, gradients clipped: ``(mean loss, tokens)``."""
    from .loss import distill_loss

    step_loss, tokens = 0.0, 0
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        with autocast(cfg, ctx):
            loss = distill_loss(wrapped, batch, teacher=teacher, **loss_kw)
        acc.backward(loss / cfg.grad_accum)
        step_loss += loss.item() / cfg.grad_accum
        tokens += int(batch["attention_mask"].sum())
    if not math.isfinite(step_loss):
        raise RecipeError(f"distill: the loss became {step_loss} at step {step + 1}. Fix: lower `lr` (now {cfg.lr}) "
                          "or raise `warmup_steps`")
    if cfg.max_grad_norm is not None:
        acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
    return step_loss, tokens
