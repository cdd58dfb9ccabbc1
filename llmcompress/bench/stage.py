"""The benchmark stage: size, memory, time to first token and decode speed of the original and the compressed model.

Fair ratios: both models are timed in this process, interleaved call by call (original, compressed, original, ...)
after warm-up, so load on a shared machine hits both alike. Figures are medians over rounds; the ratio of a timed
figure is the median of its per-round compressed/original ratios (the two calls of a pair ran back to back, so slow
drift of the machine's load cancels), the ratio of a size or memory figure is a plain quotient. Every call is kept.
Memory and load time come from a fresh process per model (``bench/memory.py``), so one model's memory never shows
in the other's figures.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..stage import StageConfig, StageResult

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext

#: Tokens the memory probe generates (batch 1, `prompt_tokens` prompt): enough to reach decode's peak, cheap.
PROBE_NEW_TOKENS = 4


class BenchmarkStage(StageConfig):
    """Speed, memory and size of the original and the compressed model, measured side by side.

    Recipe sample::

        - type: benchmark
          batch_sizes: [1, 8]
          prompt_tokens: 16
          new_tokens: 16
          repeats: 3
          warmup: 1
          memory: true
          backend: hf

    Prompts are windows of real text (Python's reference docs), the same for both models; generation is greedy and
    always exactly ``new_tokens`` long.

    Figures per model: ``size_bytes`` (weight files), ``param_bytes`` (weights in memory); from the fresh process:
    ``load_s``, ``rss_load_bytes`` (after load; safetensors are mmapped, so untouched weights do not count yet),
    ``peak_rss_bytes`` and ``peak_rss_model_bytes`` (peak minus the process with torch and transformers imported);
    timed, at the smallest batch size: ``ttft_ms`` (call to first token), ``prefill_tok_s`` (prompt tokens / TTFT),
    ``decode_ms_per_token_bs{B}``; at every batch size: ``decode_tok_s_bs{B}`` (batch x (new_tokens - 1) / time from
    the first to the last token).
    """

    type: Literal["benchmark"] = "benchmark"
    backend: Literal["hf"] = Field("hf", description="Generation engine: hf = transformers `generate`.")
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 8], description="Batch sizes to time decode at (sorted; the smallest gives TTFT)."
    )
    prompt_tokens: int = Field(16, description="Tokens per prompt (every sequence of a batch has exactly this many).")
    new_tokens: int = Field(16, description="Tokens generated per sequence (greedy, forced with min_new_tokens); >= 2.")
    repeats: int = Field(3, description="Timed rounds per model; figures are medians over rounds.")
    warmup: int = Field(
        1, description="Untimed calls per model before timing, at the smallest batch size (the first call is slower)."
    )
    memory: bool = Field(True, description="Measure load time and peak RSS, one fresh process per model.")

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one batch size, e.g. [1, 8]")
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"batch sizes must be distinct, got {v}")
        return sorted(v)

    @field_validator("prompt_tokens", "repeats")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("new_tokens")
    @classmethod
    def _new_tokens(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2 (the first token counts as time to first token, the rest as decode)")
        return v

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (0 = no warm-up call)")
        return v

    def run(self, ctx: "RunContext") -> StageResult:
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(ctx.runtime.threads)  # deliberate: on a shared 2-core box 2 threads ran 4-10x slower
        same = ctx.current is ctx.original
        handles = {"original": ctx.original} if same else {"original": ctx.original, "compressed": ctx.current}
        calls_per_model = self.warmup + self.repeats * len(self.batch_sizes)
        total = (len(handles) if self.memory else 0) + calls_per_model * len(handles)
        with ctx.task(f"{self.label} ({self.backend})", total=total) as advance:
            backends = self._backends(ctx, handles)  # loads and checks both models before any timing
            memory = {role: self._memory(ctx, h, advance) for role, h in handles.items()} if self.memory else {}
            calls = self.time_interleaved(backends, advance)
        figures, per_repeat = {}, {}
        for role, handle in handles.items():
            per_repeat[role] = _per_repeat(calls, role, self.batch_sizes[0])
            figures[role] = self._figures(handle, backends[role], memory.get(role), per_repeat[role])
        if same:
            figures["compressed"] = dict(figures["original"])
        paired = {} if same else _paired_ratios(per_repeat)
        ratios = {k: _ratio(figures["compressed"][k], v) for k, v in figures["original"].items()}
        ratios.update({k: round(statistics.median(v), 4) for k, v in paired.items() if None not in v})
        data = {
            "settings": self._settings(ctx, backends),
            "same_model": same,
            "models": {"original": ctx.original.describe(), "compressed": ctx.current.describe()},
            **figures,
            "ratios": ratios,
            "raw": {"calls": calls, "per_repeat": per_repeat, "memory": memory,
                    "paired_ratios": paired},
        }
        seconds = time.perf_counter() - t0
        return StageResult(type="benchmark", label=self.label, seconds=seconds, data=data,
                           summary=summarize(figures, ratios, same))

    def _memory(self, ctx: "RunContext", handle: "ModelHandle", advance) -> dict:
        """The memory probe's JSON. The original's is cached across runs (same weights, settings and versions)."""
        from .memory import measure_memory

        fresh = []

        def probe() -> dict:
            ctx.log(f"benchmark: load time and memory of the {handle.role} model, in a fresh process")
            fresh.append(True)
            return measure_memory(handle.path, ctx.runtime.device, ctx.runtime.dtype, ctx.runtime.threads,
                                  prompt_tokens=self.prompt_tokens, new_tokens=PROBE_NEW_TOKENS)

        if handle is ctx.original:
            key = {"backend": self.backend, "prompt_tokens": self.prompt_tokens, "new_tokens": PROBE_NEW_TOKENS}
            result = ctx.baseline("bench-memory", key, probe)
        else:
            result = probe()
        advance(1, description=f"benchmark: memory of the {handle.role} model")
        return {**result, "cached": not fresh}

    def _backends(self, ctx: "RunContext", handles: dict[str, "ModelHandle"]) -> dict[str, Any]:
        from . import BACKENDS

        cls = BACKENDS.get(self.backend)
        backends = {role: cls.from_handle(h) for role, h in handles.items()}
        for b in backends.values():
            b.check(self.prompt_tokens, self.new_tokens, where=f"stages[{ctx.stage_index}] ({self.label})")
        return backends

    def time_interleaved(self, backends: dict[str, Any], advance=lambda *a, **k: None) -> list[dict]:
        """Time every (round, batch size), alternating models call by call. Returns one dict per call, in order."""
        prompts = {role: {bs: b.prompts(bs, self.prompt_tokens) for bs in self.batch_sizes}
                   for role, b in backends.items()}
        # Warm-up at the smallest batch only: measured on CPU, the very first call is ~10% slow and the first call
        # at a larger batch is not, while a bf16 warm-up at batch 8 costs ~10 s per model on a 2-core box.
        plan = [("warmup", r, [self.batch_sizes[0]]) for r in range(self.warmup)]
        plan += [("timed", r, self.batch_sizes) for r in range(self.repeats)]
        calls = []
        for phase, r, batch_sizes in plan:
            gc.collect()  # once a round: a full collection costs ~0.2 s with torch and transformers loaded
            for bs in batch_sizes:
                for role, backend in backends.items():
                    gc.disable()  # no collector pause inside a timed call
                    try:
                        timing = backend.generate(prompts[role][bs], self.new_tokens)
                    finally:
                        gc.enable()
                    calls.append({"phase": phase, "repeat": r, "role": role, **timing.as_dict()})
                    advance(1, description=f"benchmark: {phase} {r + 1}, batch {bs}, {role}")
        return calls

    def _figures(self, handle: "ModelHandle", backend: Any, memory: dict | None, per_repeat: dict) -> dict:
        out: dict[str, Any] = {"size_bytes": handle.size_bytes, "param_bytes": backend.param_bytes()}
        if memory:
            out.update(load_s=memory["load_s"], rss_load_bytes=memory["rss_load_bytes"],
                       peak_rss_bytes=memory["peak_rss_bytes"],
                       peak_rss_model_bytes=memory["peak_rss_bytes"] - memory["rss_base_bytes"])
            if "peak_gpu_bytes" in memory:
                out["peak_gpu_bytes"] = memory["peak_gpu_bytes"]
        out.update({k: round(statistics.median(v), 4) for k, v in per_repeat.items()})
        return out

    def _settings(self, ctx: "RunContext", backends: dict[str, Any]) -> dict:
        from .prompts import SOURCE

        ids = [b.prompts(self.batch_sizes[0], self.prompt_tokens) for b in backends.values()]
        return {
            "backend": self.backend, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "batch_sizes": list(self.batch_sizes), "repeats": self.repeats, "warmup": self.warmup,
            **ctx.runtime.describe(),
            "ttft_batch_size": self.batch_sizes[0], "prompt_source": SOURCE,
            "same_prompt_ids": all(i == ids[0] for i in ids), "decoding": "greedy",
            "memory": "fresh process per model, peak = VmHWM" if self.memory else "off",
        }


def _per_repeat(calls: list[dict], role: str, ttft_batch: int) -> dict[str, list[float]]:
    """Timed figures of one model, one value per round (in round order)."""
    out: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(round(value, 4))

    for c in calls:
        if c["phase"] != "timed" or c["role"] != role:
            continue
        if c["batch_size"] == ttft_batch:
            add("ttft_ms", 1000 * c["ttft_s"])
            add("prefill_tok_s", c["prefill_tok_s"])
        add(f"decode_tok_s_bs{c['batch_size']}", c["decode_tok_s"])
        if c["batch_size"] == ttft_batch:
            add(f"decode_ms_per_token_bs{ttft_batch}", 1000 * c["decode_s"] / (c["new_tokens"] - 1))
    return out


def _ratio(new: float, old: float) -> float | None:
    return round(new / old, 4) if old else None


def _paired_ratios(per_repeat: dict[str, dict[str, list[float]]]) -> dict[str, list[float | None]]:
    """compressed / original per round: the two calls of a pair ran back to back, so this shows the ratio's noise."""
    o, c = per_repeat["original"], per_repeat["compressed"]
    return {k: [_ratio(b, a) for a, b in zip(o[k], c[k])] for k in o if k in c}


_UNITS = [  # figure prefix -> (summary label, unit, scale, digits)
    ("size_bytes", "size", "MiB", 2**-20, 1),
    ("peak_rss_bytes", "peak RSS", "MiB", 2**-20, 0),
    ("peak_rss_model_bytes", "peak RSS (model)", "MiB", 2**-20, 0),
    ("peak_gpu_bytes", "peak GPU", "MiB", 2**-20, 0),
    ("load_s", "load", "s", 1, 2),
    ("ttft_ms", "TTFT", "ms", 1, 0),
    ("prefill_tok_s", "prefill", "tok/s", 1, 1),
    ("decode_tok_s_bs", "decode bs", "tok/s", 1, 1),
]


def summarize(figures: dict[str, dict], ratios: dict[str, float | None], same: bool) -> dict[str, str]:
    """Short lines like ``"decode bs1": "41.2 -> 55.0 tok/s (1.33x)"``; the ratio is ``ratios[figure]``."""
    out = {}
    orig, comp = figures["original"], figures["compressed"]
    for key, value in orig.items():
        for prefix, label, unit, scale, digits in _UNITS:
            if key == prefix or (prefix.endswith("_bs") and key.startswith(prefix)):
                name = label + key[len(prefix):] if prefix.endswith("_bs") else label
                a = f"{value * scale:.{digits}f}"
                if same:
                    out[name] = f"{a} {unit}"
                else:
                    ratio = "n/a" if ratios.get(key) is None else f"{ratios[key]:.2f}x"
                    out[name] = f"{a} -> {comp[key] * scale:.{digits}f} {unit} ({ratio})"
    return out
