"""What every benchmark backend returns for one timed generate call, and the interface it implements."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class GenTiming:
    """Timestamps of one ``generate`` call on a batch of equal-length prompts (greedy, exactly ``new_tokens``)."""

    batch_size: int
    prompt_tokens: int  # per sequence
    new_tokens: int  # generated per sequence
    ttft_s: float  # call -> first generated token: prefill plus the first sampling step
    decode_s: float  # first -> last generated token: the other new_tokens - 1 steps, prefill excluded
    total_s: float  # the whole call

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second, counting the whole time to first token as prefill."""
        return self.batch_size * self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the decode steps (all sequences of the batch together)."""
        return self.batch_size * (self.new_tokens - 1) / self.decode_s

    @property
    def decode_ms_per_token(self) -> float:
        """Milliseconds per decode step (one new token for every sequence of the batch)."""
        return 1000 * self.decode_s / (self.new_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


class Backend(Protocol):
    """A generation engine the benchmark can time. ``name`` is its registry key (``BACKENDS``)."""

    name: str

    @classmethod
    def from_handle(cls, handle: Any) -> "Backend":
        """Load (or reuse) the model of a ``ModelHandle``."""

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        """Raise RecipeError when the model cannot take prompts this long (before any timing)."""

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        """``batch`` prompts of exactly ``tokens`` token ids (see ``prompts.prompt_ids``)."""

    def param_bytes(self) -> int:
        """Bytes held by the model's weights in memory (quantized weights at their packed size)."""

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        """Generate exactly ``new_tokens`` greedy tokens for every prompt, and time it."""
