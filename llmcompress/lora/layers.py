"""Which modules are linear layers, and which carry a LoRA adapter (shared by init, merge, qat and vision)."""

from __future__ import annotations

from typing import Any


def _is_linear_like(module: Any) -> bool:
    """nn.Linear and the quantized layers that stand in for it (bnb, hqq, gptq, ...): they have in/out features."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children())


def lora_layers(peft_model: Any) -> list[tuple[str, Any]]:
    """``(name in the base model, LoRA layer)`` for every layer with an adapter."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
