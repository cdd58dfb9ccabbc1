"""Image data for the vision stages: the builtin digits (classification and detection), image folders, hub
datasets (as ``datasets.Dataset``), subsets and label matching."""

from __future__ import annotations

import numpy as np
import pytest

from llmcompress.errors import RecipeError
from llmcompress.vision.data import ImageDataConfig, digits_arrays, from_hf_dataset, label_ids, load_images


def test_digits_split_is_fixed_and_stratified():
    train_x, train_y = digits_arrays("train")
    test_x, test_y = digits_arrays("test")
    assert train_x.shape == (1437, 8, 8) and test_x.shape == (360, 8, 8) and train_x.dtype == np.uint8
    assert train_x.max() == 255 and set(np.bincount(test_y)) <= {35, 36, 37}  # about 36 of each digit
    again = digits_arrays("test")
    assert np.array_equal(again[0], test_x) and np.array_equal(again[1], test_y)
    with pytest.raises(RecipeError, match="splits `train` and `test`"):
        digits_arrays("validation")


def test_digits_detect_boxes_hold_the_pasted_digits():
    data = load_images(ImageDataConfig(source="builtin:digits-detect", split="test"), None, "object-detection")
    assert len(data) == 200 and data.task == "object-detection" and data.class_names == [str(i) for i in range(10)]
    n_boxes = 0
    for im, t in zip(data.images, data.targets):
        pixels = np.asarray(im)
        assert pixels.shape == (64, 64) and 1 <= len(t["boxes"]) <= 3 and len(t["boxes"]) == len(t["labels"])
        inside = np.zeros_like(pixels, dtype=bool)
        for x0, y0, x1, y1 in t["boxes"].astype(int):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 12 <= x1 - x0 <= 20
            assert pixels[y0:y1, x0:x1].max() > 100  # a digit is there
            assert not inside[y0:y1, x0:x1].any()  # boxes never overlap
            inside[y0:y1, x0:x1] = True
        assert pixels[~inside].max() == 0  # nothing outside the boxes
        n_boxes += len(t["boxes"])
    assert 300 < n_boxes < 500
    same = load_images(ImageDataConfig(source="builtin:digits-detect", split="test"), None, "object-detection")
    assert same.fingerprint == data.fingerprint


def test_samples_draw_a_seeded_subset():
    cfg = ImageDataConfig(split="test", samples=50, seed=3)
    a, b = load_images(cfg, None, "image-classification"), load_images(cfg, None, "image-classification")
    assert len(a) == 50 and a.labels == b.labels and a.fingerprint == b.fingerprint
    other = load_images(cfg.model_copy(update={"seed": 4}), None, "image-classification")
    assert other.fingerprint != a.fingerprint


def test_imagefolder_classes_are_subfolders(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        folder = tmp_path / "pets" / "test" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_images(ImageDataConfig(source="imagefolder:pets", split="test"), tmp_path, "image-classification")
    assert data.name == "pets" and data.class_names == ["cat", "dog"] and data.labels == [0, 0, 0, 1, 1, 1]
    assert data.notes == []
    with pytest.raises(RecipeError, match=r"has the splits test, not `tset`.*Fix: set `data.split`"):
        load_images(ImageDataConfig(source="imagefolder:pets", split="tset"), tmp_path, "image-classification")
    flat = load_images(ImageDataConfig(source="imagefolder:pets/test", split="train"), tmp_path,
                       "image-classification")
    assert len(flat.images) == 6 and "no `train/` subfolder" in flat.notes[0]
    with pytest.raises(RecipeError, match="no images in class subfolders"):
        (tmp_path / "empty" / "x").mkdir(parents=True)
        load_images(ImageDataConfig(source="imagefolder:empty"), tmp_path, "image-classification")


def test_hub_datasets_convert_from_datasets_objects():
    import datasets
    from PIL import Image

    img = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    cls = datasets.Dataset.from_dict(
        {"img": [img, img], "label": [1, 0]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])}))
    data = from_hf_dataset(cls, ImageDataConfig(source="hf:x/y", image_column="img"), "image-classification")
    assert data.class_names == ["ant", "bee"] and data.labels == [1, 0] and data.images[0].mode == "RGB"
    det = datasets.Dataset.from_dict({"image": [img], "objects": [{"bbox": [[1.0, 2.0, 3.0, 4.0]], "category": [2]}]})
    data = from_hf_dataset(det, ImageDataConfig(source="hf:x/y"), "object-detection")
    assert data.targets[0]["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and data.targets[0]["labels"].tolist() == [2]
    with pytest.raises(RecipeError, match="has no column `picture`.*Fix: set `image_column`"):
        from_hf_dataset(cls, ImageDataConfig(source="hf:x/y", image_column="picture"), "image-classification")


def test_labels_match_the_model_by_name_or_placeholder():
    from types import SimpleNamespace

    data = load_images(ImageDataConfig(split="test", samples=5), None, "image-classification")
    named = SimpleNamespace(id2label={i: str(9 - i) for i in range(10)})
    assert label_ids(data, named) == [9 - i for i in range(10)]  # by name, whatever the order
    placeholders = SimpleNamespace(id2label={i: f"LABEL_{i}" for i in range(10)})
    assert label_ids(data, placeholders) == list(range(10)) and any("placeholders" in n for n in data.notes)
    with pytest.raises(RecipeError, match="not the model's labels.*Fix: evaluate on data with the model's classes"):
        label_ids(data, SimpleNamespace(id2label={0: "cat", 1: "dog"}))


def test_hub_data_fails_fast_offline(monkeypatch):
    from llmcompress.vision.data import check_data

    monkeypatch.setattr("llmcompress.utils.net.hub_reachable", lambda *a, **k: False)
    with pytest.raises(RecipeError, match="needs the Hugging Face hub.*Fix: use `builtin:digits`"):
        check_data(ImageDataConfig(source="hf:cifar10"), None, "image-classification", "evaluate")
