"""The llamacpp backend: a GGUF file served by llama-server, driven over its OpenAI HTTP API like the vllm backend.

What it runs: a folder of ours in ``gguf`` format runs its own ``model.gguf``; a dense Hugging Face folder (the
original, a pruned model) runs as llama.cpp's F16 conversion of it, made once and cached — the llama.cpp baseline a
user would start from. Folders llama.cpp cannot read (GPTQ, bnb, torchao, ...) raise ``Unservable`` and are listed,
not timed. A batch of B prompts is B concurrent streamed requests on B server slots (continuous batching).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import RecipeError
from ..serving.support import Unservable
from ..backends.base import GenTiming
from ..backends.prompts import prompt_ids
from . import runtime
from .server import LlamaServer, LlamaServerOptions

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext


def gguf_for(handle: "ModelHandle") -> tuple[Path, str, tuple[str, ...]]:
    """``(GGUF file, what it is, GGUF LoRA adapters)`` llama.cpp runs for a model folder; ``Unservable`` when there
    is none. A base + LoRA folder (``merge: keep``) runs as its base with the adapter converted to a GGUF adapter."""
    from .convert import check_convertible, f16_of, lora_gguf_of
    from .model import gguf_file

    path = Path(handle.path)
    fmt = handle.meta.get("format", "hf")
    if fmt == "gguf":
        return gguf_file(path), f"{handle.meta.get('gguf_type', 'gguf')} GGUF", ()
    if fmt == "peft":
        from ..context import ModelHandle

        base = ModelHandle(handle.role, path / "base", handle.runtime)
        gguf, what, _ = gguf_for(base)
        adapter = lora_gguf_of(path, path / "base", handle.fingerprint())
        return gguf, f"{what} + LoRA adapter (llama.cpp's convert_lora_to_gguf.py)", (str(adapter),)
    config = path / "config.json"
    quantized = config.is_file() and "quantization_config" in json.loads(config.read_text())
    if fmt != "hf" or quantized:
        raise Unservable(f"`{path}` is a {fmt if fmt != 'hf' else 'quantized transformers'} folder; llama.cpp runs "
                         "GGUF files. Fix: quantize with `method: gguf`, or export it with `format: gguf`.")
    try:
        check_convertible(path, "the llamacpp backend")
    except RecipeError as e:
        raise Unservable(str(e)) from None
    return f16_of(path, handle.fingerprint()), "F16 GGUF (llama.cpp's conversion of the dense folder)", ()


class LlamaCppBackend:
    """A GGUF model under llama-server (see the module docstring)."""

    name = "llamacpp"

    def __init__(self, server: LlamaServer, tokenizer_dir: Path, what: str):
        self.server, self.tokenizer_dir, self.what = server, tokenizer_dir, what
        self._tokenizer = None
        self._owned = False

    @classmethod
    def preflight(cls, where: str) -> None:
        runtime.require(where)

    @classmethod
    def bench_settings(cls, stage: Any, n_models: int) -> dict[str, Any]:
        """Server settings for a benchmark: a slot per request of the largest batch, each long enough for one."""
        return {"parallel": max(stage.batch_sizes), "slot_ctx": stage.prompt_tokens + stage.new_tokens + 8}

    @classmethod
    def open(cls, handle: "ModelHandle", ctx: "RunContext | None" = None, **overrides: Any) -> "LlamaCppBackend":
        runtime.require("the llamacpp backend")
        gguf, what, lora = gguf_for(handle)
        base = {"threads": handle.runtime.threads, "seed": handle.runtime.seed, "lora": lora}
        limit = _max_len(handle.path)
        if limit:
            base["slot_ctx"] = min(limit, 2048)
        options = LlamaServerOptions(**{**base, **overrides})
        if ctx is not None:
            server = ctx.engine(gguf, options, lambda log: LlamaServer(model=gguf, options=options, log_path=log,
                                                                       name=handle.role), kind="llama-server")
            backend = cls(server, handle.path, what)
        else:
            backend = cls(LlamaServer(model=gguf, options=options, name=handle.role).start(), handle.path, what)
            backend._owned = True
        return backend

    def __enter__(self) -> "LlamaCppBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self.server.close()

    def ready(self) -> "LlamaCppBackend":
        if self.server.ready_s is None:
            self.server.wait_ready()
        return self

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        return self._tokenizer

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        limit = self.server.options.slot_ctx
        if prompt_tokens + new_tokens > limit:
            raise RecipeError(f"{where}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds "
                              f"llama-server's context per slot ({limit}). Fix: lower `prompt_tokens` or `new_tokens`.")
        self.ready()

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        return prompt_ids(self.tokenizer, batch, tokens)

    def param_bytes(self) -> int | None:
        return self.ready().server.model_memory_bytes()

    def memory(self) -> dict[str, Any]:
        s = self.ready().server
        return {"load_s": round(s.ready_s, 3), "peak_rss_bytes": s.peak_rss_bytes,
                "model_memory_bytes": s.model_memory_bytes(), "what": "llama-server process, RSS sampled every "
                "0.2 s; load_s = process start to /health answering"}

    def describe(self) -> dict[str, Any]:
        o = self.server.options
        return {"engine": f"llama.cpp {runtime.LLAMA_CPP_COMMIT} llama-server", "model": self.what,
                "batching": f"continuous ({o.parallel} slots of {o.slot_ctx} tokens)", "threads": o.threads,
                "repack": runtime.repack_note(), **({"lora": list(o.lora)} if o.lora else {})}

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        from ..serving.client import run_batch

        self.ready()
        # cache_prompt off: the rounds repeat their prompts, and a slot would skip the prefill it already holds
        timings, wall = run_batch(self.server.url, self.server.name, prompt_ids, new_tokens,
                                  api_key=self.server.options.api_key, cache_prompt=False)
        first = max(t.token_s[0] for t in timings)
        last = max(t.token_s[-1] for t in timings)
        return GenTiming(batch_size=len(prompt_ids), prompt_tokens=len(prompt_ids[0]), new_tokens=new_tokens,
                         ttft_s=first, decode_s=last - first, total_s=wall, ttfts_s=tuple(t.ttft_s for t in timings),
                         itls_s=tuple(x for t in timings for x in t.itl_s))

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        from ..serving.client import stream_chat

        self.ready()
        yield from stream_chat(self.server.url, self.server.name, messages, max_tokens=max_new_tokens,
                               api_key=self.server.options.api_key, **sampling)


def _max_len(path: Path) -> int | None:
    try:
        return int(json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings") or 0) or None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
