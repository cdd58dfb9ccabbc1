"""Which images a stage uses (``ImageDataConfig``, validated when the recipe loads, no torch), and the lora stage's
``data:`` that is text or images. Loading the images is the vision family's (``vision/data.py``).

Sources: ``builtin:digits`` (scikit-learn's 8x8 digits), ``builtin:digits-detect`` (detection canvases made from
them), ``imagefolder:<path>`` (relative to the recipe's folder), ``hf:<dataset>[:<config>]`` (needs hub access).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from ..errors import RecipeError
from .calibration import CalibrationConfig

DIGITS, DIGITS_DETECT = "builtin:digits", "builtin:digits-detect"
IMAGEFOLDER, HF = "imagefolder:", "hf:"
#: Keys only an image data config has (a lora `data:` with one of them is images, not text).
_IMAGE_KEYS = {"split", "image_column", "label_column"}


class ImageDataConfig(BaseModel):
    """Which images a vision stage uses: ``data: {source: builtin:digits, split: test, samples: null}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    #: What the data is: the LLM family reads it to refuse image ``data`` (models/family.py imports no data config).
    modality: ClassVar[str] = "images"

    source: str = Field(DIGITS, description="`builtin:digits`, `builtin:digits-detect` (detection), "
                        "`imagefolder:<path>` or `hf:<dataset>[:<config>]` (needs hub access).")
    split: str | None = Field(None, description="`train` or `test` (builtin), a split name (hf) or subfolder "
                              "(imagefolder). Default: test to evaluate, train to fine-tune.")
    samples: int | None = Field(None, ge=1, description="Images used (a seeded random subset); null = all.")
    seed: int = Field(0, description="Seeds the subset drawn when `samples` is set.")
    image_column: str = Field("image", description="hf: the column holding the images.")
    label_column: str = Field("label", description="hf: the class column (detection: `objects`).")

    @field_validator("source")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in (DIGITS, DIGITS_DETECT):
            return v
        if v.startswith(IMAGEFOLDER) and v[len(IMAGEFOLDER):].strip():
            return v
        if v.startswith(HF) and v[len(HF):].split(":")[0].strip():
            return v
        raise ValueError(f"source `{v}` must be `{DIGITS}`, `{DIGITS_DETECT}`, `imagefolder:<path>` or "
                         "`hf:<dataset>[:<config>]`")

    @property
    def name(self) -> str:
        """The name results are filed under: ``digits``, the folder's name, the dataset id."""
        if self.source.startswith("builtin:"):
            return self.source.split(":", 1)[1]
        if self.source.startswith(IMAGEFOLDER):
            return Path(self.source[len(IMAGEFOLDER):]).name or "imagefolder"
        return self.source[len(HF):]

    @property
    def task(self) -> str | None:
        """The task a builtin source is made for (None: any)."""
        return {DIGITS: "image-classification", DIGITS_DETECT: "object-detection"}.get(self.source)

    def with_split(self, split: str) -> "ImageDataConfig":
        return self if self.split is not None else self.model_copy(update={"split": split})


def _data_kind(v: Any) -> str:
    if isinstance(v, ImageDataConfig):
        return "images"
    if isinstance(v, dict):
        src = str(v.get("source", ""))
        if src.startswith(("builtin:digits", IMAGEFOLDER)) or _IMAGE_KEYS & set(v):
            return "images"
    return "text"


#: The lora stage's ``data:``: text (``CalibrationConfig``) for LLMs, images for vision models (by its source).
TrainDataConfig = Annotated[
    Union[Annotated[CalibrationConfig, Tag("text")], Annotated[ImageDataConfig, Tag("images")]],
    Discriminator(_data_kind),
]


def check_data(cfg: ImageDataConfig, base_dir: Path | None, task: str | None, where: str) -> None:
    """Cheap checks before weights load: the folder exists, the hub is reachable, the source fits the task."""
    if task is not None and cfg.task is not None and cfg.task != task:
        fix = DIGITS_DETECT if task == "object-detection" else DIGITS
        raise RecipeError(f"{where}: `{cfg.source}` is {cfg.task} data, and the model is an {task} model. "
                          f"Fix: use `source: {fix}`.")
    if cfg.source.startswith(IMAGEFOLDER):
        if task == "object-detection":
            raise RecipeError(f"{where}: an imagefolder has class labels, no boxes. Fix: for detection use "
                              f"`{DIGITS_DETECT}` or an hf dataset with an `objects` column.")
        root = _folder(cfg, base_dir)
        if not root.is_dir():
            raise RecipeError(f"{where}: no such folder `{root}`. Fix: check the path (relative to the recipe).")
    elif cfg.source.startswith(HF):
        from ..errors import require
        from ..utils.net import hub_reachable

        require("datasets", "eval", f"{where}: `{cfg.source}`")
        if not hub_reachable(datasets=True):
            raise RecipeError(f"{where}: `{cfg.source}` needs the Hugging Face hub, which is not reachable from "
                              f"here. Fix: use `{DIGITS}` or an `imagefolder:<path>`.")


def _folder(cfg: ImageDataConfig, base_dir: Path | None) -> Path:
    p = Path(cfg.source[len(IMAGEFOLDER):]).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p
