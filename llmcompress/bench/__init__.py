"""Benchmarks: size, memory, time to first token and decode speed, original and compressed interleaved.

Generation engines sit behind one small interface (see ``hf.py``), registered here by name so that another backend
(vLLM) fits beside the transformers one without touching the stage.
"""

from __future__ import annotations

from ..registry import Registry

#: Benchmark backends: name -> class with ``prompts(batch, tokens)`` and ``generate(prompt_ids, new_tokens)``.
BACKENDS: Registry = Registry("benchmark backend")
BACKENDS.register_lazy("hf", "llmcompress.bench.hf:HFBackend")
