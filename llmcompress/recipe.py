"""Recipe schema and loading: YAML -> validated, frozen pydantic models, with errors that name the place and the fix.

A recipe::

    name: quickstart
    model: smollm2-135m          # builtin name | HF id | local folder | .gguf file
    dtype: bfloat16
    stages:
      - {type: quantize, method: bnb-nf4}
      - {type: evaluate, tasks: [pydoc_ppl, pydoc_cloze]}
      - {type: benchmark}

Relative paths in a recipe are relative to the recipe file's folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import LLMCompressError, RecipeError
from .models.spec import ModelSpec
from .registry import did_you_mean
from .stage import METHODS, STAGES, StageConfig
from .utils.io import read_yaml
from .utils.schema import shown_path, unknown_key


#: More torch threads than any machine has cores (torch overflows somewhere above 2**31 / 64).
MAX_THREADS = 1024


def _stage_union() -> Any:
    members = [STAGES.get(name) for name in STAGES.names()]
    return Annotated[Union[tuple(members)], Field(discriminator="type")]


Stage = _stage_union()


class Recipe(BaseModel):
    """A named model plus the list of stages to run on it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200,
        description="Run name; the default run folder is runs/<name> (a folder name: at most 200 characters).",
    )
    model: ModelSpec
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype models run in. auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else float32 (emulated bf16 ran ~6x slower than fp32 on an AVX2-only CPU).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds python, numpy and torch before every stage "
                      "(numpy takes 0 .. 2**32 - 1).")
    threads: int | None = Field(
        None,
        ge=1,
        le=MAX_THREADS,
        description="torch CPU threads; default: half the cores (1 on a 2-core box, where 2 ran 4-10x slower).",
    )
    memory_check: bool = Field(
        True, description="Refuse, before weights load, a run whose estimated peak memory (docs/scaling.md) exceeds "
        "this machine's memory; false runs it anyway.")
    stages: list[Stage] = Field(min_length=1)  # type: ignore[valid-type]

    _path: Path | None = PrivateAttr(None)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_stage_order(self) -> "Recipe":
        quantized_by = None
        for i, stage in enumerate(self.stages):
            if stage.type == "prune" and quantized_by is not None:
                raise ValueError(
                    f"stages[{i}] (prune) comes after stages[{quantized_by}] (quantize), but pruning needs dense "
                    "weights. Fix: put the prune stage before the quantize stage."
                )
            if stage.type == "quantize":
                if quantized_by is not None:
                    raise ValueError(
                        f"stages[{i}] (quantize) would quantize a model that stages[{quantized_by}] already quantized. "
                        "Fix: keep one quantize stage (to compare methods, write one recipe per method or a sweep)."
                    )
                quantized_by = i
        for i, stage in enumerate(self.stages):
            problem = stage.check_after(self.stages[:i])
            if problem:
                raise ValueError(f"stages[{i}] ({stage.kind}): {problem}")
        return self

    @property
    def path(self) -> Path | None:
        """The file this recipe was read from (None when built in Python)."""
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path else Path.cwd()

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the recipe, relative to the recipe's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_recipe(source: str | Path | dict, overrides: list[str] | None = None, *, origin: str | Path | None = None,
                where: str | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with a message naming the file, stage and fix.

    ``origin``: for a dict, the file it came from (relative paths resolve against its folder). ``where``: how errors
    name a dict recipe (default ``recipe``), e.g. ``sweep.yaml: grid point 3``.
    """
    where = where or "recipe"
    path = Path(origin) if origin is not None else None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source)
        where = str(source)
        if not path.exists():
            raise RecipeError(f"{where}: no such recipe file. Fix: check the path (try `llmcompress ls` for examples).")
        raw = read_yaml(path, where)
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: a recipe is a mapping with `name`, `model` and `stages`, got {type(raw).__name__}."
        )
    for item in overrides or []:
        apply_override(raw, item, where)
    _precheck_stages(raw, where)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, raw, where)) from None
    recipe._path = path.resolve() if path else None
    from .models.kind import check_kind

    try:
        # a vision model with an LLM-only setting (and back) fails here
        check_kind(recipe.model, recipe.stages, recipe.base_dir, where)
    except LLMCompressError as e:  # e.g. the model folder's config.json is unreadable: say which recipe named it
        if not str(e).startswith(where):
            e.args = (f"{where}: {e}",)
        raise
    return recipe


def apply_override(raw: dict, item: str, where: str = "recipe") -> None:
    """Apply one ``dotted.path=value`` override (value parsed as YAML) to the raw recipe dict, in place."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.0.bits=4")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise RecipeError(f"--set {item!r}: `{key}` is not a dotted recipe key. Fix: e.g. --set stages.0.bits=4")
    parts = [p.strip() for p in parts]
    value = _override_value(item, text)
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _step(node, part, parts[: depth + 1], item)
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(node, last, parts, item)
        node[idx] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {item!r}: `{'.'.join(parts[:-1])}` is a value, not a mapping or list.")


def _override_value(item: str, text: str) -> Any:
    from .utils.io import yaml_error
    from .utils.yamlsafe import YAMLInputError, loads

    if not text.strip():
        return None
    try:
        return loads(text)
    except YAMLInputError as e:
        fix = " Fix: write a YAML value, e.g. --set stages.0.bits=4, --set 'stages.1.tasks=[pydoc_ppl]' (quoted)."
        raise RecipeError(yaml_error(e, f"--set {item!r}: the value") + fix) from None


def _step(node: Any, part: str, so_far: list[str], item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, so_far, item)]
    if isinstance(node, dict):
        if part not in node:
            node[part] = {}
        return node[part]
    raise RecipeError(f"--set {item!r}: `{'.'.join(so_far[:-1])}` is a value, not a mapping or list.")


def _index(node: list, part: str, so_far: list[str], item: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise RecipeError(
            f"--set {item!r}: `{'.'.join(so_far)}` is not an index of a list with {len(node)} items "
            f"(use 0..{len(node) - 1})."
        )
    return int(part)


def _stage_where(where: str, i: int, stage: Any) -> str:
    t = stage.get("type") if isinstance(stage, dict) else None
    return f"{where}: stages[{i}]" + (f" ({t})" if t else "")


def _precheck_stages(raw: dict, where: str) -> None:
    """Did-you-mean errors for unknown stage types and methods (pydantic's union errors are unreadable)."""
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return  # pydantic reports it
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise RecipeError(f"{where}: stages[{i}] must be a mapping with a `type:` key, got {stage!r}.")
        t = stage.get("type")
        if t is None:
            raise RecipeError(f"{where}: stages[{i}] has no `type:`. Choices: {', '.join(STAGES.names())}.")
        if t not in STAGES:
            raise RecipeError(
                f"{where}: stages[{i}]: unknown stage type `{t}`.{did_you_mean(str(t), STAGES.names())} "
                f"Choices: {', '.join(STAGES.names())}."
            )
        registry = _method_registry(t)
        if registry is not None:
            m = stage.get("method")
            if m is None or m not in registry:
                got = f"unknown method `{m}`." if m is not None else "no `method:` given."
                hint = did_you_mean(str(m), registry.names()) if m is not None else ""
                raise RecipeError(
                    f"{_stage_where(where, i, stage)}: {got}{hint} Choices: {', '.join(registry.names())}."
                )


def _method_registry(stage_type: str):
    """The method registry of a stage type that has one (quantize, prune), else None."""
    return METHODS.get(stage_type) if stage_type in METHODS else None


def _stage_class(stage: Any) -> type[StageConfig] | None:
    if not isinstance(stage, dict) or stage.get("type") not in STAGES:
        return None
    registry = _method_registry(stage["type"])
    if registry is not None:
        return registry.get(stage["method"]) if stage.get("method") in registry else None
    return STAGES.get(stage["type"])


def format_validation_error(err: ValidationError, raw: dict, where: str) -> str:
    """Turn pydantic's errors into lines like ``x.yaml: stages[1] (quantize): `bits` must be ..., got 5``."""
    lines = []
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    for e in err.errors():
        loc = list(e["loc"])
        prefix = where + ":"
        cls: type[BaseModel] = Recipe
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int) and loc[1] < len(stages):
            i = loc[1]
            stage = stages[i]
            prefix = _stage_where(where, i, stage) + ":"
            cls = _stage_class(stage) or Recipe
            # Drop the discriminator tags pydantic puts into the location of union members.
            loc = [p for p in loc[2:] if p not in (stage.get("type"), stage.get("method"))]
        field = shown_path(cls, loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            lines.append(unknown_key(prefix, cls, loc))
            continue
        if e["type"] == "missing":
            lines.append(f"{prefix} `{field}` is required.")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = f", got {e['input']!r}" if "input" in e and not isinstance(e["input"], (dict, list)) else ""
        lines.append(f"{prefix} `{field}`: {msg}{got}." if field else f"{prefix} {msg}")
    return "\n".join(lines)


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a recipe file as written: pydantic's schema of ``Recipe`` by alias, plus the
    shorthands the YAML accepts before validation (``model: <name, hub id, folder or .gguf>`` as a string). Editors
    use it to complete and check recipes (``llmcompress schema``; YAML language servers read ``# yaml-language-server:
    $schema=<file>``)."""
    schema = Recipe.model_json_schema(by_alias=True)
    model = schema["properties"]["model"]
    schema["properties"]["model"] = {"anyOf": [{"type": "string", "description": "builtin name, hub id, local "
                                                "folder or .gguf file"}, model], "description": model.get(
                                                    "description", "The model to compress.")}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llmcompress recipe"
    return schema
