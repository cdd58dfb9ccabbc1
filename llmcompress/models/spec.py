"""The recipe's ``model:``: where the model comes from and, when config.json cannot tell, what kind it is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .family import FAMILIES, task_names


class ModelSpec(BaseModel):
    """Where the model comes from. A bare string in the recipe is shorthand for ``{source: <string>}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    source: str = Field(description="Builtin name (see `llmcompress ls`), HF hub id, local folder or .gguf file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when it is a folder or hub repo.")

    @field_validator("source", "gguf_file")
    @classmethod
    def _no_overlong_name(cls, v: str | None) -> str | None:
        # Probing such a path raises ENAMETOOLONG (the file system's limit is 255 bytes per name).
        if v is not None and any(len(p.encode(errors="surrogateescape")) > 255 for p in v.split("/")):
            raise ValueError(f"`{v[:60]}...` has a name longer than 255 bytes, so it is no file, folder or hub id. "
                             "Fix: a builtin model name, a save_pretrained folder, a .gguf file or org/name")
        return v
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless you trust it.")
    kind: Literal[("auto", *FAMILIES.names())] = Field(  # type: ignore[valid-type]
        "auto", description="auto = from config.json `architectures`; vision = image classification / detection.")
    task: Literal[task_names()] | None = Field(  # type: ignore[valid-type]
        None, description="Vision models: the task (default: from config.json).")
