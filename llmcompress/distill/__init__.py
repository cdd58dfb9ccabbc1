"""The ``distill`` stage: knowledge distillation from a teacher (the original, or an earlier stage's model) into the
current model, all weights or a LoRA adapter merged at the end. The teacher's top-k log-probs are cached on disk first
(``topk.py``), so the teacher is never in memory while the student trains; the loss (``loss.py``) is shared with the
lora stage's ``objective: distill``."""
