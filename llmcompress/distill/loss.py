"""The distillation loss, shared by the distill stage and the lora stage's ``objective: distill``.

KL(P_teacher || P_student) per token at temperature T, times T² (Hinton et al.: keeps the gradient scale independent
of T), averaged over positions with attention. The teacher comes as one of:

- a model (run here, under ``no_grad``);
- full logits cached on disk (``lora/teacher.py`` ``TeacherLogits``: ``rows(index)``);
- top-k log-probs cached on disk (``distill/topk.py`` ``TopKLogits``: ``targets(index)``): the teacher's k largest
  log-probs and the log of the mass left over. The loss is then the exact KL between the (k+1)-way coarsened
  distributions: the same k tokens, plus one bucket holding every other token, for both models. With k = vocabulary
  size the bucket is empty and this is the full KL.

Optionally (``hidden_weight`` > 0) the loss adds the MSE (or 1 - cosine) between the teacher's and the student's last
hidden states, cached with the top-k log-probs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def full_kl(log_p: "torch.Tensor", log_q: "torch.Tensor") -> "torch.Tensor":
    """``(B, T)``: sum_v p (log p - log q) over the vocabulary; both ``(B, T, V)`` log-probs."""
    import torch.nn.functional as F

    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def topk_kl(t_vals: "torch.Tensor", t_idx: "torch.Tensor", t_rest: "torch.Tensor",
            s_logits: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """``(B, T)``: KL between the (k+1)-bucket teacher and student distributions.

    Args:
        t_vals: ``(B, T, k)`` the teacher's top-k log-probs at temperature T (any float dtype).
        t_idx: ``(B, T, k)`` their token ids.
        t_rest: ``(B, T)`` log of the teacher's remaining mass (``-inf`` when k covers the vocabulary).
        s_logits: ``(B, T, V)`` the student's logits (not divided by T yet).
    """
    import torch

    s = s_logits.float() / temperature
    log_z = torch.logsumexp(s, dim=-1)  # (B, T)
    idx = t_idx.long()
    s_top = s.gather(-1, idx)  # (B, T, k)
    log_q = s_top - log_z.unsqueeze(-1)
    # the student's rest bucket, computed directly (not 1 - sum q_k, which cancels badly when k holds ~all the mass)
    rest = s.scatter(-1, idx, float("-inf"))
    log_q_rest = torch.logsumexp(rest, dim=-1) - log_z  # (B, T), -inf when k = V
    log_p = t_vals.float()
    log_p_rest = t_rest.float()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    p_rest = log_p_rest.exp()
    rest_term = p_rest * (log_p_rest - log_q_rest)
    # an empty bucket on either side (k = V, or the teacher's mass all in its top k): 0 log 0 = 0
    rest_term = torch.where(p_rest > 0, rest_term, torch.zeros_like(rest_term))
    return kl + rest_term


def hidden_loss(t_hidden: "torch.Tensor", s_hidden: "torch.Tensor", kind: str = "mse") -> "torch.Tensor":
    """``(B, T)``: per-token MSE (mean over features) or 1 - cosine similarity of the last hidden states."""
    import torch.nn.functional as F

    t, s = t_hidden.float(), s_hidden.float()
    if kind == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).mean(-1)


def masked_mean(per_token: "torch.Tensor", mask: "torch.Tensor") -> "torch.Tensor":
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


def distill_loss(model: Any, batch: dict, teacher: Any = None, temperature: float = 1.0,
                 hidden_weight: float = 0.0, hidden_kind: str = "mse"):
    """The training loss of a batch (``input_ids``, ``attention_mask``, ``index``: rows of the cached teacher)."""
    import torch
    import torch.nn.functional as F

    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = hidden_weight > 0
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=hidden)
    s_logits = out.logits  # (B, T, V)
    with torch.no_grad():
        if hasattr(teacher, "targets"):  # top-k cache (distill/topk.py)
            target = teacher.targets(batch["index"], device=ids.device)
        elif hasattr(teacher, "rows"):  # full logits cache (lora/teacher.py)
            target = {"logits": teacher.rows(batch["index"]).to(ids.device)}
        else:
            t_out = teacher(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=hidden)
            target = {"logits": t_out.logits, **({"hidden": t_out.hidden_states[-1]} if hidden else {})}
    if "logits" in target:
        log_p = F.log_softmax(target.pop("logits").float() / temperature, dim=-1)
        log_q = F.log_softmax(s_logits.float() / temperature, dim=-1)
        kl = full_kl(log_p, log_q)
    else:
        kl = topk_kl(target["values"], target["indices"], target["rest"], s_logits, temperature)
    loss = masked_mean(kl, mask) * temperature**2
    if hidden:
        loss = loss + hidden_weight * masked_mean(hidden_loss(target["hidden"], out.hidden_states[-1], hidden_kind),
                                                  mask)
    return loss
