"""Plain supervised training and accuracy of an image classifier on tensors (the builtin model's trainer)."""

from __future__ import annotations

from typing import Any


def pixel_tensor(images: Any, labels: Any, processor: Any, config: Any) -> tuple[Any, Any]:
    """uint8 (N, H, W) digit images + labels -> ``(pixel_values (N, C, h, w), labels (N,))`` via the processor."""
    import torch
    from PIL import Image

    from .data import to_model_input

    pixels = to_model_input([Image.fromarray(x, "L") for x in images], processor, config)
    return pixels, torch.as_tensor(labels, dtype=torch.long)


def train_classifier_(model: Any, x: Any, y: Any, epochs: int, batch_size: int, lr: float, weight_decay: float,
                      seed: int) -> list[float]:
    """AdamW with a one-cycle schedule, cross-entropy; returns the mean loss of each epoch."""
    import torch

    steps_per_epoch = -(-len(y) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order, total = torch.randperm(len(y), generator=gen), 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i: i + batch_size]
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item() * len(idx)
        losses.append(total / len(y))
    model.eval()
    return losses


def accuracy(model: Any, x: Any, y: Any, batch_size: int = 256) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat([model(pixel_values=x[i: i + batch_size]).logits.argmax(-1)
                          for i in range(0, len(y), batch_size)])
    return (pred == y).float().mean().item()
