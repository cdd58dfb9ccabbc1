"""Vision-language models (Llava, Idefics3/SmolVLM, ...): the LLM stages compress the language part only.

The quantize and prune stages run exactly as for an LLM, with the vision tower and the projector into the language
model (``kind.VLM_VISION_MODULES``) added to ``skip``, whatever the recipe's ``skip`` says: image features keep
full precision and the recipe written for the LLM works on its VLM as is. The result says which modules stayed
dense. Folders load with ``AutoModelForImageTextToText`` (``kind.auto_model_class``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageResult


def run_language_part(stage: Any, ctx: "RunContext", run: Callable) -> "StageResult":
    """``run`` (the LLM stage's) with the vision modules skipped; reports what stayed dense."""
    from ..utils.patterns import matches_any
    from .kind import VLM_VISION_MODULES

    skip = list(stage.skip) + [p for p in VLM_VISION_MODULES if p not in stage.skip]
    stage = stage.model_copy(update={"skip": skip})
    result = run(stage, ctx)
    model = ctx.current.load()[0]
    dense, changed = [], []
    for name, m in model.named_modules():
        if name and not list(m.children()) and matches_any(name, list(VLM_VISION_MODULES)) and hasattr(m, "weight"):
            (dense if _plain(m) else changed).append(name)
    result.data["vision_modules"] = {"dense": len(dense), "changed": changed, "patterns": list(VLM_VISION_MODULES)}
    result.data["applied_config"] = stage.model_dump(mode="json", exclude_none=True)
    result.summary["vision tower"] = f"{len(dense)} layers left dense" + (f", {len(changed)} changed" if changed
                                                                          else "")
    return result


def _plain(m: Any) -> bool:
    """A layer that still holds a plain float weight (not replaced by a quantized layer)."""
    import torch

    w = getattr(m, "weight", None)
    return w is not None and type(w.data) is torch.Tensor and w.is_floating_point()
