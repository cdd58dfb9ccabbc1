"""What kind of model a recipe names is decided by the model families (``models.family``: ``vision`` and ``vlm``
live in ``vision.family``); this module keeps the names the vision code and older callers use.

- ``vision``: an image classifier (``*ForImageClassification``, timm models through ``TimmWrapper``) or an object
  detector (``*ForObjectDetection``: DETR, YOLOS, ...).
- ``vlm``: a vision-language model (a config with both ``vision_config`` and ``text_config``, e.g. Llava, Idefics3):
  the LLM stages run on its language part, the vision tower stays dense.
- ``llm``: everything else (causal LMs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..models import kind as _kind
from ..models.family import auto_model_class, folder_kind, kind_of_config

if TYPE_CHECKING:
    from ..recipe import Recipe

__all__ = ["VLM_VISION_MODULES", "auto_model_class", "folder_kind", "hub_kind", "kind_of_config", "spec_kind"]

#: Module names (regexes) of a VLM that the LLM stages leave alone: the vision encoder and the projector into the
#: language model. Names as transformers 5 spells them for Llava, LlavaNext, Idefics3/SmolVLM, Qwen2-VL, Gemma 3.
VLM_VISION_MODULES = (r"(.*\.)?vision_tower(\..*)?", r"(.*\.)?vision_model(\..*)?", r"(.*\.)?visual(\..*)?",
                      r"(.*\.)?multi_modal_projector(\..*)?", r"(.*\.)?connector(\..*)?")


def spec_kind(recipe: "Recipe") -> tuple[str | None, str | None]:
    """``(kind, task)`` of the recipe's model without the hub (``models.kind.spec_kind``)."""
    return _kind.spec_kind(recipe.model, recipe.base_dir)


def hub_kind(recipe: "Recipe") -> tuple[str | None, str | None]:
    """``(kind, task)`` of a hub model from its config.json (``models.kind.hub_kind``)."""
    return _kind.hub_kind(recipe.model)

