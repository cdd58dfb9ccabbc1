"""A GGUF model folder run by llama.cpp in this process (llama-cpp-python), for evaluation.

``load_gguf`` is the ``gguf`` entry of ``models.loading.FORMATS``: ``ModelHandle.load()`` of a folder holding
``model.gguf`` gives a ``LlamaCppModel``, which answers the one call our evaluator makes of a model —
``model(input_ids=..., logits_to_keep=n).logits`` with full logits over the vocabulary — so perplexity and KL
against the original run on the very windows every other model runs on, and ``lm_eval_model`` gives lm-eval an LM
over the same logits (loglikelihood, rolling loglikelihood for perplexity tasks, and greedy generation). Generation
for the benchmark and the app goes through llama-server instead (``backend.py``).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import LLMCompressError
from . import runtime

FILE = "model.gguf"


def gguf_file(folder: Path) -> Path:
    """The GGUF file of a gguf model folder (``file`` in its llmcompress.json)."""
    from ..models.loading import read_meta

    name = read_meta(Path(folder)).get("file", FILE)
    path = Path(folder) / name
    if not path.is_file():
        raise LLMCompressError(f"`{folder}` is a gguf model folder without its `{name}`. Fix: re-run the stage that "
                               "wrote it.")
    return path


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    if (Path(folder) / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder))
    return SimpleNamespace(max_position_embeddings=None)


def load_gguf(path: str | Path, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
              n_ctx: int = 2048, **kwargs: Any) -> "LlamaCppModel":
    if device != "cpu":
        raise LLMCompressError(f"a GGUF model is evaluated by llama.cpp on the CPU here, not on `{device}`. "
                               "Fix: set `device: cpu`.")
    return LlamaCppModel(gguf_file(Path(path)), _config(Path(path)), n_ctx=n_ctx,
                         threads=threads or torch.get_num_threads())


class LlamaCppModel(torch.nn.Module):
    """llama.cpp's logits behind the slice of the transformers interface the evaluator uses (see the module doc)."""

    def __init__(self, gguf: Path, config: Any, n_ctx: int = 2048, threads: int = 1):
        super().__init__()
        llama_cpp = runtime.import_llama_cpp("a GGUF model")
        self.config, self.path, self.n_ctx = config, Path(gguf), n_ctx
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int):
            self.n_ctx = min(n_ctx, limit)
        # A parameter of no size: callers take the model's device and dtype from its parameters.
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads, seed=0,
                                   verbose=False)
        # Freed before interpreter shutdown: llama-cpp-python's __del__ at shutdown finds its ctypes gone and prints
        # a TypeError (close() is idempotent, so its own __del__ later is a no-op).
        weakref.finalize(self, self.llm.close)

    def describe(self) -> dict[str, Any]:
        return {"engine": f"llama.cpp {runtime.LLAMA_CPP_COMMIT} (llama-cpp-python {runtime.PIN})",
                "threads": self.llm.n_threads, "n_ctx": self.n_ctx, "flash_attention": "off"}

    def row_logits(self, ids: list[int]):
        """Logits (len(ids), vocab) float32 numpy for one sequence, from an empty context."""
        import numpy as np

        if len(ids) > self.n_ctx:
            raise LLMCompressError(f"llama.cpp: {len(ids)} tokens exceed this model's context ({self.n_ctx}).")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy_text(self, ids: list[int], max_tokens: int, stop: list[str]) -> str:
        """Greedy continuation of ``ids`` (lm-eval's generation tasks)."""
        self.llm.reset()
        out = self.llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, stop=stop)
        return out["choices"][0]["text"]

    def forward(self, input_ids=None, attention_mask=None, use_cache: bool = False, logits_to_keep: int = 0,
                **kwargs: Any) -> SimpleNamespace:
        rows = []
        for i, row in enumerate(input_ids.tolist()):
            if attention_mask is not None:  # left or right padding: score the real tokens only
                mask = attention_mask[i].tolist()
                row = [t for t, m in zip(row, mask) if m]
            logits = torch.from_numpy(self.row_logits(row))
            rows.append(logits[-logits_to_keep:] if logits_to_keep else logits)
        return SimpleNamespace(logits=torch.stack(rows))

    def lm_eval_model(self, tokenizer: Any, batch_size: int = 1):
        from .lm_eval_lm import LlamaCppLM

        return LlamaCppLM(self, tokenizer)
