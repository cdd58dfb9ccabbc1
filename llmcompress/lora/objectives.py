"""Training objectives: ``loss(model, batch, teacher, temperature) -> scalar tensor`` (registered in ``lora/__init__``).

- ``sft``: mean next-token cross-entropy over the target tokens (labels != -100).
- ``distill``: mean over real tokens of KL(P_teacher || P_student) at temperature T, times T² (Hinton et al.: keeps
  the gradient scale independent of T). The teacher is the original model (or its logits on the training sequences,
  cached on disk by ``teacher.py``, or their top-k by ``distill/topk.py`` with ``top_k:``, so that it is not in
  memory while the student trains; one loss for both stages: ``distill/loss.py``), the student the quantized
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
    """KL(teacher || student) per token, averaged over positions with attention (no labels needed): the distill
    stage's loss (distill/loss.py), with the teacher as a model, full cached logits or a top-k cache."""
    from ..distill.loss import distill_loss as shared

    return shared(model, batch, teacher=teacher, temperature=temperature)


__all__ = ["IGNORE", "distill_loss", "sft_loss"]
