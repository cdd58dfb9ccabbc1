"""Generation backends: one interface (``base.Backend``) over transformers (``hf``) and vLLM (``vllm``).

The benchmark stage times them, the evaluate stage picks one for lm-eval tasks, the app streams chat through them.
"""

from __future__ import annotations

from ..registry import Registry

#: Generation backends: name -> class implementing ``base.Backend``.
BACKENDS: Registry = Registry("generation backend")
BACKENDS.register_lazy("hf", "llmcompress.backends.hf:HFBackend")
BACKENDS.register_lazy("vllm", "llmcompress.backends.vllm:VLLMBackend")
BACKENDS.register_lazy("llamacpp", "llmcompress.llamacpp.backend:LlamaCppBackend")
