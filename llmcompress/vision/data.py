"""Images for vision stages: loading what an ``ImageDataConfig`` (``data/images.py``, validated when the recipe
loads) names.

Sources:
- ``builtin:digits``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits, 10 classes), split
  once into 1,437 train / 360 test images (stratified, seed 0). Always available, no download.
- ``builtin:digits-detect``: object detection built from the same digits: 1 to 3 digits of the split, scaled to 12-20
  px, pasted without overlap on a 64x64 black canvas; the boxes and classes are known exactly (train: 600 canvases
  from train digits, test: 200 from test digits).
- ``imagefolder:<path>``: ``<path>/<class name>/<image files>`` (or ``<path>/<split>/<class name>/...``).
- ``hf:<dataset>[:<config>]``: a hub image dataset (``image_column``, ``label_column``; detection: an ``objects``
  column with COCO ``bbox`` [x, y, w, h] and ``category``). Needs hub access; offline it fails at once.

Paths are relative to the recipe's folder. Class names are matched to the model's ``id2label`` by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.images import (  # noqa: F401 - the configs live with the other data configs; re-exported here
    DIGITS, DIGITS_DETECT, HF, IMAGEFOLDER, ImageDataConfig, TrainDataConfig, _folder, check_data)
from ..errors import RecipeError

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CANVAS = 64  # digits-detect canvas side (pixels)
_DETECT_COUNTS = {"train": 600, "test": 200}


@dataclass
class ImageSet:
    """Loaded images: ``labels`` (classification) or ``targets`` (detection: ``{"boxes": (k, 4) xyxy pixels,
    "labels": (k,)}`` per image), both as dataset class indices into ``class_names``."""

    name: str
    task: str
    images: list
    class_names: list[str]
    labels: list[int] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def load_images(cfg: ImageDataConfig, base_dir: Path | None, task: str) -> ImageSet:
    """The images of ``cfg`` (its split must be set: see ``with_split``)."""
    split = cfg.split or "test"
    if cfg.source == DIGITS:
        out = _digits(split)
    elif cfg.source == DIGITS_DETECT:
        out = _digits_detect(split)
    elif cfg.source.startswith(IMAGEFOLDER):
        out = _imagefolder(_folder(cfg, base_dir), split)
    else:
        out = _hf(cfg, split, task)
    out.name = cfg.name
    if task != out.task:
        raise RecipeError(f"data `{cfg.source}` holds {out.task} data, and the model is an {task} model.")
    return _subset(out, cfg)


def digits_arrays(split: str) -> tuple["np.ndarray", "np.ndarray"]:
    """``(images uint8 (N, 8, 8) in 0..255, labels (N,))`` of one split of scikit-learn's digits."""
    from ..errors import require

    require("sklearn", "vision", "The builtin digits data")
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise RecipeError(f"builtin digits have the splits `train` and `test`, not `{split}`. Fix: use one of them.")
    d = load_digits()
    idx = np.arange(len(d.target))
    train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    pick = np.sort(train if split == "train" else test)
    images = np.round(d.images[pick] * (255 / 16)).astype(np.uint8)  # digits are 0..16
    return images, d.target[pick].astype(np.int64)


def _digits(split: str) -> ImageSet:
    import hashlib

    from PIL import Image

    from ..utils.io import stable_hash

    images, labels = digits_arrays(split)
    return ImageSet(name="digits", task="image-classification", images=[Image.fromarray(x, "L") for x in images],
                    labels=labels.tolist(), class_names=[str(i) for i in range(10)],
                    fingerprint=stable_hash(["digits", split, hashlib.sha256(images.tobytes()).hexdigest(),
                                             labels.tolist()]))


def _digits_detect(split: str) -> ImageSet:
    """Canvases of 1-3 non-overlapping digits with their exact boxes (seeded: the same every time)."""
    import numpy as np
    from PIL import Image

    from ..utils.io import stable_hash

    digits, labels = digits_arrays(split)
    rng = np.random.default_rng(1 if split == "train" else 2)
    images, targets = [], []
    for _ in range(_DETECT_COUNTS[split]):
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        boxes, classes = [], []
        for _ in range(int(rng.integers(1, 4))):
            i, size = int(rng.integers(len(digits))), int(rng.integers(12, 21))
            for _try in range(20):  # place without overlap
                x, y = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
                box = (x, y, x + size, y + size)
                if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1] for b in boxes):
                    patch = Image.fromarray(digits[i], "L").resize((size, size), Image.BILINEAR)
                    canvas[y:y + size, x:x + size] = np.asarray(patch)
                    boxes.append(box)
                    classes.append(int(labels[i]))
                    break
        images.append(Image.fromarray(canvas, "L"))
        targets.append({"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                        "labels": np.asarray(classes, dtype=np.int64)})
    fp = stable_hash(["digits-detect", split, [t["labels"].tolist() for t in targets],
                      [t["boxes"].tolist() for t in targets]])
    return ImageSet(name="digits-detect", task="object-detection", images=images, targets=targets,
                    class_names=[str(i) for i in range(10)], fingerprint=fp)


def _imagefolder(root: Path, split: str) -> ImageSet:
    from PIL import Image

    from ..utils.io import stable_hash

    base = root / split if (root / split).is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    splits = [c for c in classes if base == root and any(q.is_dir() for q in (root / c).iterdir())]
    if splits:  # a <split>/<class>/ layout without the split asked for
        raise RecipeError(f"imagefolder `{root}` has the splits {', '.join(splits)}, not `{split}`. Fix: set "
                          f"`data.split` to one of them.")
    files = [(f, c) for c_i, c in enumerate(classes) for f in sorted((base / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise RecipeError(f"imagefolder `{base}` has no images in class subfolders (`{base}/<class>/*.png`). "
                          "Fix: lay the folder out as <class name>/<image files>.")
    images = []
    for f, _ in files:
        with Image.open(f) as im:
            images.append(im.copy())
    labels = [classes.index(c) for _, c in files]
    fp = stable_hash([[str(f.relative_to(base)), f.stat().st_size, int(f.stat().st_mtime)] for f, _ in files])
    out = ImageSet(name=root.name, task="image-classification", images=images, labels=labels,
                   class_names=classes, fingerprint=fp)
    if base == root:
        out.notes.append(f"imagefolder `{root}` has no `{split}/` subfolder: all its images are the `{split}` split "
                         "(a LoRA stage and an evaluate stage on it use the same images)")
    return out


def _hf(cfg: ImageDataConfig, split: str, task: str) -> ImageSet:
    from datasets import load_dataset

    name, _, config = cfg.source[len(HF):].partition(":")
    try:
        ds = load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean the same to the user
        raise RecipeError(f"data `{cfg.source}` (split `{split}`) did not load: {e}") from None
    return from_hf_dataset(ds, cfg, task)


def from_hf_dataset(ds: Any, cfg: ImageDataConfig, task: str) -> ImageSet:
    """An ``ImageSet`` from a ``datasets.Dataset`` (classification: a ClassLabel column; detection: ``objects``
    with COCO ``bbox`` [x, y, w, h] and ``category``)."""
    import numpy as np

    from ..utils.io import stable_hash

    col = "objects" if task == "object-detection" and cfg.label_column == "label" else cfg.label_column
    for c in (cfg.image_column, col):
        if c not in ds.column_names:
            raise RecipeError(f"data `{cfg.source}` has no column `{c}` (columns: {', '.join(ds.column_names)}). "
                              "Fix: set `image_column` / `label_column`.")
    feature = ds.features[col]
    if task == "image-classification":
        names = getattr(feature, "names", None) or [str(x) for x in sorted(set(ds[col]))]
        raw = ds[col]
        labels = raw if getattr(feature, "names", None) else [names.index(str(x)) for x in raw]
        return ImageSet(name=cfg.name, task=task, images=[im.convert("RGB") for im in ds[cfg.image_column]],
                        labels=list(labels), class_names=list(names), fingerprint=stable_hash([ds._fingerprint]))
    cat = feature["category"] if isinstance(feature, dict) else feature.feature["category"]
    names = list(getattr(cat, "names", None) or getattr(getattr(cat, "feature", None), "names", []) or [])
    targets = []
    for objs in ds[col]:
        b = np.asarray(objs["bbox"], dtype=np.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]  # COCO xywh -> xyxy
        targets.append({"boxes": b, "labels": np.asarray(objs["category"], dtype=np.int64)})
    if not names:
        names = [str(i) for i in range(int(max((t["labels"].max() for t in targets if len(t["labels"])),
                                                default=0)) + 1)]
    return ImageSet(name=cfg.name, task=task, images=[im.convert("RGB") for im in ds[cfg.image_column]],
                    targets=targets, class_names=names, fingerprint=stable_hash([ds._fingerprint]))


def _subset(data: ImageSet, cfg: ImageDataConfig) -> ImageSet:
    from ..utils.io import stable_hash

    if cfg.samples is None or cfg.samples >= len(data):
        if cfg.samples is not None:
            data.notes.append(f"`samples: {cfg.samples}` asked for more than the {len(data)} images there are: "
                              "all are used")
        return data
    import numpy as np

    keep = np.sort(np.random.default_rng(cfg.seed).choice(len(data), size=cfg.samples, replace=False)).tolist()
    data.images = [data.images[i] for i in keep]
    data.labels = [data.labels[i] for i in keep] if data.labels else []
    data.targets = [data.targets[i] for i in keep] if data.targets else []
    data.fingerprint = stable_hash([data.fingerprint, keep])
    return data


def label_ids(data: ImageSet, config: Any) -> list[int]:
    """For each dataset class, the model's label id: by name (``id2label``), or by position when the model's labels
    are transformers' placeholders (``LABEL_0``, ...). Raises RecipeError naming the classes that do not match."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    by_name = {v: k for k, v in id2label.items()}
    if all(c in by_name for c in data.class_names):
        return [by_name[c] for c in data.class_names]
    placeholders = all(v == f"LABEL_{k}" for k, v in id2label.items())
    if placeholders and len(id2label) >= len(data.class_names):
        data.notes.append("the model's labels are placeholders (LABEL_0..): dataset class i is model label i")
        return list(range(len(data.class_names)))
    missing = [c for c in data.class_names if c not in by_name][:5]
    raise RecipeError(
        f"the data's classes ({', '.join(data.class_names[:10])}) are not the model's labels "
        f"({', '.join(list(by_name)[:10])}); no match for {', '.join(missing)}. Fix: evaluate on data with the "
        "model's classes (class folder names = the model's id2label names), or fine-tune a model on these classes."
    )


def to_model_input(images: list, processor: Any, config: Any):
    """``pixel_values`` (B, C, H, W) float32 for ``images`` through the model's image processor."""
    mode = "L" if getattr(config, "num_channels", 3) == 1 else "RGB"
    return processor(images=[im.convert(mode) for im in images], return_tensors="pt")["pixel_values"]


def model_input(images: list, processor: Any, model: Any):
    """``to_model_input`` on the model's device, in the dtype its weights hold (a bf16 model takes bf16 pixels)."""
    return to_model_input(images, processor, model.config).to(next(model.parameters()).device,
                                                              dtype=input_dtype(model))


def input_dtype(model: Any):
    """The dtype the first plain floating parameter holds (pixel values must match it)."""
    import torch

    for p in model.parameters():
        if p.is_floating_point() and type(p.data) is torch.Tensor:
            return p.dtype
    return torch.float32
