"""Training objectives: ``loss(model, batch, teacher, temperature) -> scalar tensor`` (registered in ``lora/__init__``).

- ``sft``: mean next-token cross-entropy over the target tokens (labels != -100).
- ``distill``: mean over real tokens of KL(P_teacher || P_student) at temperature T, times T² (Hinton et al.: keeps
  the gradient scale independent of T). The teacher is the original model (or its logits on the training sequences,
  cached on disk by ``teacher.py``, so that it is not in memory while the student trains), the student the quantized
  model with the adapter; the direction matches the evaluate stage's KL(original || compressed), so the training loss
  at T=1 is the figure the report measures (on other text).
"""

from __future__ import annotations

from typing import Any

from .data import IGNORE


def sft_loss(model: Any, batch: dict, teacher: Any = None, temperature: float = 1.0):
    """Next-token cross-entropy on the targets (transformers shifts the labels by one)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False)
    return out.loss


def distill_loss(model: Any, batch: dict, teacher: Any = None, temperature: float = 1.0):
    """KL(teacher || student) per token, averaged over positions with attention (no labels needed)."""
    import torch
    import torch.nn.functional as F

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if hasattr(teacher, "rows"):  # the teacher's logits cached on disk (lora/teacher.py)
            t_logits = teacher.rows(batch["index"]).to(ids.device).float()
        else:
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (B, T, V)
        log_p = F.log_softmax(t_logits / temperature, dim=-1)
        del t_logits
    s_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (B, T, V)
    log_q = F.log_softmax(s_logits / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # (B, T): sum p (log p - log q)
    weight = mask.to(kl.dtype)
    return (kl * weight).sum() / weight.sum().clamp_min(1) * temperature**2


__all__ = ["IGNORE", "distill_loss", "sft_loss"]
