"""Vision models through the same recipes and stages: the vision and vision-language model families.

Image classification (ViT, ResNet, ConvNeXt, timm models through transformers' ``TimmWrapper``, ...) and object
detection (DETR, YOLOS, ...) models run through the ordinary stage types: the ``vision`` family (``family.py``,
registered in ``models.family.FAMILIES``) runs each stage type with its implementation in ``VISION_STAGES`` (modules
in this package); the ``vlm`` family runs the LLM stages on a VLM's language part. Reading a recipe imports nothing
heavy from here.
"""

from __future__ import annotations

from ..registry import Registry

TASKS = ("image-classification", "object-detection")

#: Builtin vision models: name -> (task, "module:function" building the cached folder).
VISION_BUILTINS: dict[str, tuple[str, str]] = {
    "digits-convnext": ("image-classification", "llmcompress.vision.builtin:digits_convnext"),
    "digits-resnet": ("image-classification", "llmcompress.vision.builtin:digits_resnet"),
    "digits-mobilenet": ("image-classification", "llmcompress.vision.builtin:digits_mobilenet"),
    "tiny-random-convnext": ("image-classification", "llmcompress.vision.tiny:tiny_random_convnext"),
    "tiny-random-yolos": ("object-detection", "llmcompress.vision.tiny:tiny_random_yolos"),
}

#: Stage type -> the vision implementation of its ``run(stage, ctx)``.
VISION_STAGES: Registry = Registry("vision stage")
VISION_STAGES.register_lazy("quantize", "llmcompress.vision.quant:run_quantize")
VISION_STAGES.register_lazy("prune", "llmcompress.vision.prune:run_prune")
VISION_STAGES.register_lazy("lora", "llmcompress.vision.lora:run_lora")
VISION_STAGES.register_lazy("evaluate", "llmcompress.vision.evaluate:run_evaluate")
VISION_STAGES.register_lazy("benchmark", "llmcompress.vision.bench:run_benchmark")
VISION_STAGES.register_lazy("export", "llmcompress.vision.export:run_export")
