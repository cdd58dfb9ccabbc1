"""Throughput race: every chosen model on every chosen backend generates the same batch, timed, one after another.

Uses the backends' own timed ``generate`` (greedy, exactly ``new_tokens`` per prompt) on their ``prompts`` (the
same token ids for every model that shares a tokenizer), after one short warm-up call. The figures come with the
conditions they were measured under, printed beside the plot.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LLMCompressError
from .config import LimitExceeded, Limits, check_race
from .pool import ModelPool

#: Columns of the race table, in order.
COLUMNS = ("model", "backend", "decode tok/s", "output tok/s", "TTFT s", "total s", "note")


@dataclass
class RaceResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    conditions: dict[str, Any] = field(default_factory=dict)


_RACE_LOCK = threading.Lock()  # a race measures alone: a second one waits (the event's concurrency limit is 1 too)


def run_race(pool: ModelPool, keys: list[str], backends: list[str], batch: int, prompt_tokens: int,
             new_tokens: int, limits: Limits) -> RaceResult:
    """Time ``generate`` for each (model, backend); rows carry the figures or the reason a pair did not run."""
    check_race(batch, prompt_tokens, new_tokens, limits)
    if not keys or not backends:
        raise LimitExceeded("Pick at least one model and one backend for the race.")
    unknown = [b for b in backends if b not in pool.backends]
    if unknown:
        raise LimitExceeded(f"Backend {unknown[0]!r} is not available here; pick from {', '.join(pool.backends)}.")
    entries = [pool.get(k) for k in dict.fromkeys(keys)]
    result = RaceResult()
    engines: dict[str, Any] = {}
    deadline = time.perf_counter() + limits.race_timeout_s
    with _RACE_LOCK:
        busy_at_start = pool.active
        for backend_name in backends:
            for entry in entries:
                row = {"model": entry.key, "backend": backend_name}
                engine = entry.engines.get(backend_name)
                why = "no such engine for this model" if engine is None else engine.status()
                if why is None and time.perf_counter() > deadline:
                    why = f"not run: the race's time limit ({limits.race_timeout_s:.0f} s) was reached"
                if why is not None:
                    result.rows.append({**row, "note": why})
                    continue
                try:
                    timing = _time_one(engine.backend, batch, prompt_tokens, new_tokens, entry.key)
                except Exception as e:  # noqa: BLE001 - one engine failing (a dead vLLM server, OOM) is its row's note
                    why = str(e) if isinstance(e, LLMCompressError) else f"failed: {type(e).__name__}: {e}"
                    result.rows.append({**row, "note": why[:500]})
                    continue
                desc = dict(engine.backend.describe())
                what = desc.pop("model", "")  # per model (llamacpp: "Q4_K_M GGUF", the original's F16 conversion)
                engines.setdefault(backend_name, desc)
                result.rows.append({**row, "decode tok/s": round(timing.decode_tok_s, 2),
                                    "output tok/s": round(timing.output_tok_s, 2), "TTFT s": round(timing.ttft_s, 3),
                                    "total s": round(timing.total_s, 3), "note": str(what)})
        result.conditions = {
            "device": pool.runtime.device, "dtype": pool.runtime.dtype, "threads": pool.runtime.threads,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "decoding": "greedy, exactly new_tokens per prompt; 1 warm-up call; models one after another",
            "engines": engines, "chats_running_at_start": busy_at_start, "chats_running_at_end": pool.active,
        }
    return result


def _time_one(backend: Any, batch: int, prompt_tokens: int, new_tokens: int, key: str):
    backend.check(prompt_tokens, new_tokens, f"race ({key})")
    prompts = backend.prompts(batch, prompt_tokens)
    backend.generate(prompts[:1], 2)  # warm-up: first-call allocations and kernel selection stay out of the figure
    return backend.generate(prompts, new_tokens)


def conditions_markdown(result: RaceResult) -> str:
    c = result.conditions
    if not c:
        return ""
    lines = ["**Measured under**", "",
             f"- device **{c['device']}** ({c['cpu']}, {c['cpu_count']} cores), dtype **{c['dtype']}**, "
             f"torch threads **{c['threads']}**",
             f"- batch **{c['batch']}** × prompt **{c['prompt_tokens']}** tokens → **{c['new_tokens']}** new tokens "
             "each",
             f"- {c['decoding']}"]
    for name, desc in c["engines"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in desc.items()))
    busy = max(c["chats_running_at_start"], c["chats_running_at_end"])
    lines.append(f"- chat requests generating meanwhile: {busy}" + (" (they shared the CPU: figures are lower)"
                                                                    if busy else ""))
    lines.append("- decode tok/s: tokens after the first / time after the first token (prefill excluded), "
                 "all sequences of the batch together")
    return "\n".join(lines)


def race_frame(result: RaceResult):
    """The bars: one per (model, backend) that ran, ``run`` (its label), ``backend``, ``tok_s`` (decode tok/s)."""
    import pandas as pd

    ran = [r for r in result.rows if "decode tok/s" in r]
    return pd.DataFrame({"run": [f"{r['model']} ({r['backend']})" for r in ran],
                         "backend": [r["backend"] for r in ran], "tok_s": [r["decode tok/s"] for r in ran]})


def build_race_tab(pool: ModelPool, limits: Limits, redact: Callable[[str], str] = str) -> dict[str, Any]:
    """The Throughput race tab (call inside a ``gr.Blocks``); ``redact`` rewrites the notes visitors see."""
    import gradio as gr
    import pandas as pd

    gr.Markdown("Every chosen model generates the same batch of prompts, timed one after another. "
                "Chats running at the same time share the CPU and lower the figures (the conditions say so).")
    with gr.Row():
        keys = gr.CheckboxGroup(pool.keys(), value=pool.keys(), label="Models")
        backends = gr.CheckboxGroup(pool.backends, value=["hf"], label="Backends")
    with gr.Row():
        batch = gr.Slider(1, limits.race_max_batch, min(4, limits.race_max_batch), step=1, label="Batch size")
        prompt_tokens = gr.Slider(1, limits.race_max_prompt_tokens, min(32, limits.race_max_prompt_tokens), step=1,
                                  label="Prompt tokens")
        new_tokens = gr.Slider(2, limits.race_max_new_tokens, min(32, limits.race_max_new_tokens), step=1,
                               label="New tokens")
    go = gr.Button("Start the race", variant="primary", elem_id="llmc-race")
    with gr.Row():
        # value None at first: an empty frame would fix the axes' types as numbers before the first race
        plot = gr.BarPlot(None, x="run", y="tok_s", color="backend", title="Decode throughput (higher is faster)",
                          x_title="model (backend)", y_title="decode tokens/s", scale=3, sort=None)
        conditions = gr.Markdown("", elem_classes=["llmc-conditions"])
    table = gr.Dataframe(headers=list(COLUMNS), interactive=False, wrap=True)

    def race(keys_, backends_, batch_, prompt_, new_):
        try:
            result = run_race(pool, list(keys_ or []), list(backends_ or []), int(batch_), int(prompt_), int(new_),
                              limits)
        except LimitExceeded as e:
            raise gr.Error(redact(str(e))) from None
        rows = pd.DataFrame(result.rows, columns=list(COLUMNS)).fillna("")
        rows["note"] = rows["note"].map(lambda v: redact(v) if isinstance(v, str) else v)  # a failed engine's error
        return race_frame(result), redact(conditions_markdown(result)), rows

    go.click(race, inputs=[keys, backends, batch, prompt_tokens, new_tokens], outputs=[plot, conditions, table],
             api_name="race", concurrency_limit=1, concurrency_id="race", time_limit=int(limits.race_timeout_s + 60))
    return {"plot": plot, "conditions": conditions, "table": table, "go": go}
