"""Model families: the kinds of model llmcompress compresses (llm, vision, vlm, ...) and what each kind brings along.

A family is found by name in ``FAMILIES`` (lazy ``"module:attr"`` entries: the core imports none of them). It says
whether a config.json is its own (``claims``, from the dict alone: no torch), how its folders load (``load``), which
recipe settings it refuses (``problem``) and how it runs a stage type (``run_stage``). The pipeline resolves the
run's family once (``RunContext.family``; ``models.kind`` decides which). A new kind is a new folder plus one line
below. This module imports nothing of llmcompress but the registry and utils.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..registry import Registry
from ..utils.io import read_config

FAMILIES: Registry = Registry("model family")
FAMILIES.register_lazy("llm", "llmcompress.models.family:LLM")
FAMILIES.register_lazy("vision", "llmcompress.vision.family:VISION")
FAMILIES.register_lazy("vlm", "llmcompress.vision.family:VLM")
#: The family of a config.json that no other family claims (the others are asked first, in name order).
DEFAULT = "llm"


class Family:
    """Causal language models, and the base of every family: each hook does what an LLM needs."""

    name = "llm"
    #: ``task:`` values its models take (none: the recipe may not set one).
    tasks: tuple[str, ...] = ()
    #: Builtin model names of this family -> their task (the builders register in ``models.MODELS``).
    builtins: dict[str, str | None] = {}

    def claims(self, conf: dict) -> bool:
        """Is a model with this config.json dict one of ours (the default family claims what is left)."""
        return True

    def task_of(self, conf: dict) -> str | None:
        return None

    def words(self, task: str | None) -> str:
        """The kind in a message: "a <words> model"."""
        return "causal language"

    def auto_class(self, task: str | None) -> str:
        """transformers' auto class that builds the architecture."""
        return "AutoModelForCausalLM"

    def check_config(self, source: str, conf: dict) -> None:
        """Refuse (RecipeError, with the fix) a model this machine cannot run, before any weights load."""

    def load(self, path: str | Path, device: str, dtype: str, **kwargs: Any) -> tuple[Any, Any] | None:
        """``(model, image processor or tokenizer)`` of a folder of this family in any layout llmcompress writes;
        None: the language-model loader (``models.loading.load_text_model``: ``FORMATS``, a tokenizer)."""
        return None

    def problem(self, stage: Any, task: str | None) -> str | None:
        """What is wrong with ``stage`` on a model of this family (recipe check, no weights), or None."""
        if stage.type == "evaluate" and stage.data is not None:
            return ("`data` gives the images a vision model is evaluated on, and this is a language model. Fix: "
                    "remove it (use `tasks` and `perplexity`), or set `model: {kind: vision, ...}` for a vision "
                    "model.")
        if stage.type == "lora" and getattr(stage.data, "modality", "text") == "images":
            return ("`data` names images, and this is a language model. Fix: use text, e.g. "
                    "`data: {source: builtin:pydoc}`.")
        if stage.type == "prune" and stage.method == "structured":
            return ("`structured` removes MLP channels of vision models (ConvNeXt, ViT, ...). Fix: for a language "
                    'model use `pattern: "2:4"` (N:M) with magnitude, wanda or sparsegpt.')
        return None

    def run_stage(self, stage: Any, ctx: Any, run: Callable) -> Any:
        """Run ``stage`` on the run's model; ``run`` is the stage type's own (generic) ``run``."""
        return run(stage, ctx)


LLM = Family()


def families() -> list[Family]:
    """Every family, in the order they are asked about a config: the default one last."""
    return [FAMILIES.get(n) for n in FAMILIES.names() if n != DEFAULT] + [FAMILIES.get(DEFAULT)]


def task_names() -> tuple[str, ...]:
    """Every ``task:`` some family's models take (the recipe schema's choices)."""
    return tuple(sorted({t for fam in families() for t in fam.tasks}))


def kind_of_config(conf: dict) -> tuple[str, str | None]:
    """``(kind, task)`` of a config.json dict: the first family that claims it."""
    for fam in families():
        if fam.claims(conf):
            return fam.name, fam.task_of(conf)
    return DEFAULT, None


def folder_kind(path: str | Path) -> tuple[str, str | None]:
    """``(kind, task)`` of a model folder: its llmcompress.json says, else its config.json (a folder without either,
    or a file, counts as an LLM: the loaders report what is missing). LLMCompressError when a file is not valid JSON."""
    path = Path(path)
    conf = path / "config.json"
    kind, task = kind_of_config(read_config(conf)) if conf.is_file() else (DEFAULT, None)
    meta = path / "llmcompress.json"
    if meta.is_file():
        m = read_config(meta)
        if m.get("kind") and m["kind"] != kind:  # an explicit `kind:` the folder was made with
            return m["kind"], m.get("task") or task
    return kind, task


def family_of_folder(path: str | Path) -> Family:
    return FAMILIES.get(folder_kind(path)[0])


def auto_model_class(path_or_config: Any):
    """The transformers auto class that loads a folder (or a config object / dict) of any kind."""
    import transformers

    if isinstance(path_or_config, (str, Path)):
        kind, task = folder_kind(path_or_config)
    else:
        conf = path_or_config if isinstance(path_or_config, dict) else path_or_config.to_dict()
        kind, task = kind_of_config(conf)
    return getattr(transformers, FAMILIES.get(kind).auto_class(task))
