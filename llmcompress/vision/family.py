"""The vision families (``models.family.FAMILIES``): image classifiers and detectors (``vision``) and
vision-language models (``vlm``). Importing this module imports nothing heavy (recipes load it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..models.family import Family
from . import TASKS, VISION_BUILTINS, VISION_STAGES

if TYPE_CHECKING:
    from ..context import RunContext

#: Architecture name suffix -> task.
_TASK_SUFFIXES = {"ForImageClassification": "image-classification", "ForObjectDetection": "object-detection"}
#: transformers' auto class per task.
AUTO_CLASSES = {"image-classification": "AutoModelForImageClassification",
                "object-detection": "AutoModelForObjectDetection"}


class VisionFamily(Family):
    """Image classification (ViT, ResNet, ConvNeXt, timm through ``TimmWrapper``) and object detection (DETR,
    YOLOS, ...): every stage type runs its implementation in ``VISION_STAGES``."""

    name = "vision"
    tasks = TASKS
    builtins = {name: task for name, (task, _) in VISION_BUILTINS.items()}

    def claims(self, conf: dict) -> bool:
        return self.task_of(conf) is not None

    def task_of(self, conf: dict) -> str | None:
        for arch in conf.get("architectures") or []:
            for suffix, task in _TASK_SUFFIXES.items():
                if arch.endswith(suffix):
                    return task
        return None

    def words(self, task: str | None) -> str:
        return f"vision ({task or 'image'})"

    def auto_class(self, task: str | None) -> str:
        return AUTO_CLASSES[task or "image-classification"]

    def check_config(self, source: str, conf: dict) -> None:
        from .timm import check_timm

        check_timm(source, None, conf)

    def load(self, path: str | Path, device: str, dtype: str, **kwargs: Any) -> tuple[Any, Any]:
        from .loading import load_vision

        return load_vision(path, device, dtype, **kwargs)

    def problem(self, stage: Any, task: str | None) -> str | None:
        from .checks import vision_problem

        return vision_problem(stage, task)

    def run_stage(self, stage: Any, ctx: "RunContext", run: Callable) -> Any:
        return VISION_STAGES.get(stage.type)(stage, ctx)


class VLMFamily(Family):
    """Vision-language models (Llava, Idefics3/SmolVLM, ...): the LLM stages on the language part, the vision tower
    and projector left dense (``vlm.run_language_part``)."""

    name = "vlm"

    def claims(self, conf: dict) -> bool:
        return "vision_config" in conf and "text_config" in conf

    def words(self, task: str | None) -> str:
        return "vision-language"

    def auto_class(self, task: str | None) -> str:
        return "AutoModelForImageTextToText"

    def problem(self, stage: Any, task: str | None) -> str | None:
        from .checks import vlm_problem

        return vlm_problem(stage, task) or super().problem(stage, task)

    def run_stage(self, stage: Any, ctx: "RunContext", run: Callable) -> Any:
        if stage.type in ("quantize", "prune"):
            from .vlm import run_language_part

            return run_language_part(stage, ctx, run)
        return run(stage, ctx)


VISION = VisionFamily()
VLM = VLMFamily()
