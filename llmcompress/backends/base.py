"""What every generation backend returns for one timed generate call, and the interface it implements."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class GenTiming:
    """Timestamps of one ``generate`` call on a batch of equal-length prompts (greedy, exactly ``new_tokens``).

    A batch is ``batch_size`` requests sent together: one ``generate`` for hf (static batching), that many concurrent
    streamed requests for vLLM (continuous batching). ``ttfts_s`` and ``itls_s`` hold each request's time to first
    token and every gap between two of its tokens; with static batching every request sees the batch's.
    """

    batch_size: int
    prompt_tokens: int  # per sequence
    new_tokens: int  # generated per sequence
    ttft_s: float  # call -> first token of every sequence: prefill plus the first sampling step
    decode_s: float  # that -> last generated token: the other new_tokens - 1 steps, prefill excluded
    total_s: float  # the whole call
    ttfts_s: tuple[float, ...] = field(default=(), repr=False)
    itls_s: tuple[float, ...] = field(default=(), repr=False)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second, counting the whole time to first token as prefill."""
        return self.batch_size * self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the decode steps (all sequences of the batch together)."""
        return self.batch_size * (self.new_tokens - 1) / self.decode_s

    @property
    def output_tok_s(self) -> float:
        """Generated tokens per second over the whole call (prefill included): offline throughput."""
        return self.batch_size * self.new_tokens / self.total_s

    @property
    def requests_s(self) -> float:
        return self.batch_size / self.total_s

    def latency(self) -> dict[str, float]:
        """p50/p95 of the requests' time to first token and of their inter-token latencies (seconds)."""
        ttfts = list(self.ttfts_s) or [self.ttft_s]
        itls = list(self.itls_s) or [self.decode_s / max(1, self.new_tokens - 1)]
        return {"ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
                "itl_p50_s": percentile(itls, 50), "itl_p95_s": percentile(itls, 95),
                "itl_mean_s": statistics.fmean(itls)}

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["ttfts_s"], out["itls_s"]
        out.update(prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s, output_tok_s=self.output_tok_s,
                   requests_s=self.requests_s, **self.latency())
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


class Backend(Protocol):
    """A generation engine. ``name`` is its registry key (``BACKENDS``). Use as a context manager or ``close()``.

    Users (benchmark, evaluate, serve, the app) look a backend up by name and call these; a backend may also offer
    the class-level ``preflight(where)`` (raise with the fix when its runtime is not installed), ``bench_settings(
    stage, runtime, n_models)`` (engine settings for a benchmark), ``unservable(handle)`` (why it cannot run a model,
    from the folder alone) and, for server backends (``served.ServedBackend``), ``title`` and ``server_label`` (what
    the app's messages call the engine and its server).
    """

    name: str

    @classmethod
    def open(cls, handle: Any, ctx: Any = None, **overrides: Any) -> "Backend":
        """Load (or reuse, within a run: ``ctx``) the model of a ``ModelHandle``; ``overrides``: engine settings."""

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        """Raise RecipeError when the model cannot take prompts this long (before any timing)."""

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        """``batch`` prompts of exactly ``tokens`` token ids (see ``prompts.prompt_ids``)."""

    def param_bytes(self) -> int | None:
        """Bytes held by the model's weights in memory (quantized weights at their packed size), if known."""

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        """Generate exactly ``new_tokens`` greedy tokens for every prompt, and time it."""

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        """Stream the reply to a chat (the tokenizer's chat template), piece by piece."""

    def memory(self) -> dict[str, Any] | None:
        """Load time and peak memory measured while this backend ran, or None (then a fresh-process probe runs)."""

    def describe(self) -> dict[str, Any]:
        """Engine settings to print beside every figure (versions, dtype, threads, ...)."""

    def close(self) -> None:
        """Free the engine (stop processes, release memory). Safe to call twice."""
