"""Tiny random vision models built from a config (no download, a second to build), for tests and dry runs.

All take 10 digit classes (``id2label`` "0".."9") so the builtin digits data evaluate them; their weights are random
(accuracy ~10%): they test that stages run and measure, not what compression costs. Cached like the LLM tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..utils.cache import cache_dir
from ..utils.io import atomic_write_json, cached_folder

VERSION = 2  # bump when an architecture below changes
LABELS = {i: str(i) for i in range(10)}


def _labels() -> dict:
    return {"num_labels": 10, "id2label": dict(LABELS), "label2id": {v: k for k, v in LABELS.items()}}


def build_convnext(path: Path) -> None:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from .builtin import digits_processor

    # layer scale 1 (not ConvNeXt's 1e-6): in a random model the blocks then matter, so adapters on them can learn
    cfg = ConvNextConfig(num_channels=3, patch_size=4, hidden_sizes=[32, 64], depths=[1, 1], num_stages=2,
                         image_size=32, layer_scale_init_value=1.0, **_labels())
    ConvNextForImageClassification(cfg).save_pretrained(path)
    digits_processor().save_pretrained(path)


def build_vit(path: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, **_labels())
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(path)


def build_resnet(path: Path) -> None:
    from transformers import ResNetConfig, ResNetForImageClassification

    from .builtin import digits_processor

    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       layer_type="basic", **_labels())
    ResNetForImageClassification(cfg).save_pretrained(path)
    digits_processor().save_pretrained(path)


def build_mobilenet(path: Path) -> None:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from .builtin import digits_processor

    # initializer_range 0.3 (not 0.02): with 0.02 the 17 random blocks shrink the logits to ~1e-26
    cfg = MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, initializer_range=0.3, **_labels())
    MobileNetV2ForImageClassification(cfg).save_pretrained(path)
    digits_processor().save_pretrained(path)


def build_yolos(path: Path) -> None:
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessorPil

    cfg = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=[64, 64], patch_size=8, num_detection_tokens=10, **_labels())
    YolosForObjectDetection(cfg).save_pretrained(path)
    YolosImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=False).save_pretrained(path)


def build_detr(path: Path) -> None:
    """DETR with transformers' own ResNet backbone (``use_timm_backbone=False``: the default needs timm)."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessorPil

    backbone = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1],
                "out_features": ["stage4"]}
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, **_labels())
    DetrForObjectDetection(cfg).save_pretrained(path)
    DetrImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(path)


def build_rtdetr(path: Path) -> None:
    """RT-DETR: transformers' ResNet-vd backbone (basic blocks) and the conv hybrid encoder (a YOLO-style neck)."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor

    backbone = {"model_type": "rt_detr_resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                "depths": [1, 1, 1, 1], "layer_type": "basic", "out_features": ["stage2", "stage3", "stage4"]}
    cfg = RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128],
                       d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, decoder_layers=1,
                       encoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                       decoder_in_channels=[32, 32, 32], **_labels())
    RTDetrForObjectDetection(cfg).save_pretrained(path)
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)


BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "convnext": ("image-classification", build_convnext), "vit": ("image-classification", build_vit),
    "resnet": ("image-classification", build_resnet), "mobilenet": ("image-classification", build_mobilenet),
    "yolos": ("object-detection", build_yolos),
    "detr": ("object-detection", build_detr), "rtdetr": ("object-detection", build_rtdetr),
}


def tiny_vision(arch: str, seed: int = 0) -> Path:
    """Cached folder of a tiny random ``arch`` (convnext, vit, resnet, mobilenet, yolos, detr, rtdetr)."""
    import torch

    task, build = BUILDERS[arch]

    def build_marked(tmp: Path) -> None:
        torch.manual_seed(seed)
        build(tmp)
        atomic_write_json(tmp / "llmcompress.json", {"format": "hf", "role": "original", "kind": "vision",
                                                     "task": task, "source": f"tiny-random-{arch}"})

    return cached_folder(cache_dir("models", f"tiny-random-{arch}-v{VERSION}"), build_marked)


def tiny_random_convnext() -> Path:
    """A tiny random ConvNeXt image classifier (2 stages of 32/64 channels, 10 digit classes)."""
    return tiny_vision("convnext")


def tiny_random_yolos() -> Path:
    """A tiny random YOLOS detector (2 layers, hidden 32, 10 detection tokens, 10 digit classes, 64x64 input)."""
    return tiny_vision("yolos")
