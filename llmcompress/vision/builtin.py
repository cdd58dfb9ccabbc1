"""The offline default vision model: a small ConvNeXt that llmcompress trains itself on scikit-learn's digits.

``digits-convnext``: ``ConvNextForImageClassification`` from a transformers config (3 stages of 64/128/256 channels,
depths 1/1/2, patch 4, 1.4M parameters; Conv2d stem, downsampling and depthwise 7x7 convs, Linear MLPs and
classifier), input 32x32 RGB through ``ConvNextImageProcessor`` (the 8x8 digits upscaled, bicubic). Trained on the
1,437-image train split (AdamW, one-cycle schedule, batch 64, 10 epochs, seed 0, ~2 min on one CPU thread), then
evaluated on the 360 held-out test images; the accuracy is written into the folder's ``llmcompress.json``. Built
once and cached under the user cache dir (``LLMCOMPRESS_CACHE`` overrides it), like the LLM default.

``digits-resnet`` and ``digits-mobilenet``: the same data, processor and training for two convolutional classifiers
that ``method: structured`` prunes by whole conv channels (``prune_conv.py``): ``ResNetForImageClassification``
(basic blocks, 64/128/256 channels, depths 2/2/2) and ``MobileNetV2ForImageClassification`` (depth multiplier 0.5,
inverted residuals with depthwise 3x3 convs).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..utils.cache import cache_dir
from ..utils.io import atomic_write_json, cached_folder

VERSION = 1  # bump when the architecture, data or training below changes
NAME = "digits-convnext"
IMAGE_SIZE = 32
EPOCHS, BATCH, LR, WEIGHT_DECAY, SEED = 10, 64, 3e-3, 0.05, 0


def digits_convnext() -> Path:
    """Cached folder of the trained digits ConvNeXt (trains it on first use)."""
    return cached_folder(cache_dir("models", f"{NAME}-v{VERSION}"), build_digits_convnext)


#: Version of each convolutional builtin (bump when its architecture, data or training changes).
CONV_VERSION = 1


def digits_resnet() -> Path:
    """Cached folder of a small ResNet trained on the digits (trains it on first use)."""
    return cached_folder(cache_dir("models", f"digits-resnet-v{CONV_VERSION}"),
                         lambda p: build_digits_model(p, "digits-resnet", _resnet_model()))


def digits_mobilenet() -> Path:
    """Cached folder of a small MobileNetV2 trained on the digits (trains it on first use)."""
    return cached_folder(cache_dir("models", f"digits-mobilenet-v{CONV_VERSION}"),
                         lambda p: build_digits_model(p, "digits-mobilenet", _mobilenet_model()))


def _labels() -> dict:
    labels = {i: str(i) for i in range(10)}
    return {"num_labels": 10, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}


def _resnet_model():
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(SEED)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256],
                                                     depths=[2, 2, 2], layer_type="basic", **_labels()))


def _mobilenet_model():
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(SEED)
    return MobileNetV2ForImageClassification(MobileNetV2Config(num_channels=3, image_size=IMAGE_SIZE,
                                                               depth_multiplier=0.5, **_labels()))


def digits_processor():
    from transformers import ConvNextImageProcessorPil

    return ConvNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_pct=1.0, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)


def build_digits_convnext(path: Path, epochs: int = EPOCHS) -> dict:
    """Train the model and write it (with its processor and metadata) to ``path``; returns the training figures."""
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, patch_size=4, hidden_sizes=[64, 128, 256], depths=[1, 1, 2], num_stages=3,
                         image_size=IMAGE_SIZE, **_labels())
    torch.manual_seed(SEED)
    return build_digits_model(path, NAME, ConvNextForImageClassification(cfg), epochs)


def build_digits_model(path: Path, name: str, model, epochs: int = EPOCHS) -> dict:
    """Train ``model`` (a fresh image classifier) on the digits and write it, its processor and metadata to
    ``path``; returns the training figures."""
    import torch

    from .data import digits_arrays
    from .train import accuracy, pixel_tensor, train_classifier_

    cfg = model.config
    processor = digits_processor()
    x_train, y_train = pixel_tensor(*digits_arrays("train"), processor, cfg)
    x_test, y_test = pixel_tensor(*digits_arrays("test"), processor, cfg)
    t0 = time.perf_counter()
    losses = train_classifier_(model, x_train, y_train, epochs=epochs, batch_size=BATCH, lr=LR,
                               weight_decay=WEIGHT_DECAY, seed=SEED)
    seconds = time.perf_counter() - t0
    top1 = accuracy(model, x_test, y_test)
    info = {"train_images": len(y_train), "test_images": len(y_test), "epochs": epochs, "batch_size": BATCH,
            "lr": LR, "weight_decay": WEIGHT_DECAY, "seed": SEED, "threads": torch.get_num_threads(),
            "train_seconds": round(seconds, 1), "loss_last_epoch": round(losses[-1], 4),
            "test_top1": round(top1, 4)}
    model.save_pretrained(path)
    processor.save_pretrained(path)
    atomic_write_json(Path(path) / "llmcompress.json", {
        "format": "hf", "role": "original", "source": name, "kind": "vision", "task": "image-classification",
        "note": f"trained here from a random init on scikit-learn's digits ({len(y_train)} train images, "
                f"{epochs} epochs): held-out top-1 {top1:.1%} on {len(y_test)} test images",
        "training": info})
    return info
