"""The vLLM backend: a model folder served by vLLM in its own process, driven over its OpenAI HTTP API.

A batch of B prompts is B concurrent streamed requests (continuous batching, as a server sees traffic), so time to
first token and inter-token latency are per request, as clients see them. Within a run one server per model folder
and settings is started once and reused by every stage (``RunContext.engine``), and stopped when the run ends.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import RecipeError
from ..serving.server import ServerOptions, VLLMServer
from ..serving.support import adapter_base, max_lora_rank, require_servable
from .base import GenTiming
from .prompts import prompt_ids

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext, Runtime

ADAPTER_NAME = "adapter"


def max_len(path: Path, cap: int = 2048) -> int:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return min(cap, int(config.get("max_position_embeddings") or cap))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):  # unreadable: vLLM's own default
        return cap


def options_for(runtime: "Runtime", path: Path, **overrides: Any) -> ServerOptions:
    """Server settings that match the run's: same device, dtype, threads and seed."""
    base = dict(device=runtime.device, dtype=runtime.dtype, threads=runtime.threads, seed=runtime.seed,
                max_model_len=max_len(path))
    return ServerOptions(**{**base, **overrides})


def make_server(path: str | Path, options: ServerOptions, log_path: Path | None, name: str = "model") -> VLLMServer:
    """A (not yet started) server for a model folder, with its LoRA adapter when the folder is base + adapter.

    Raises ``serving.support.Unservable`` with the reason and the fix when vLLM cannot serve the folder here.
    """
    require_servable(path, options.device, "vLLM cannot serve this model here")
    base, adapter = adapter_base(path)
    adapters = {ADAPTER_NAME: adapter} if adapter is not None else {}
    if adapter is not None:
        options = ServerOptions(**{**options.__dict__, "max_lora_rank": max_lora_rank(adapter)})
    return VLLMServer(model=base, options=options, log_path=log_path, name=name, adapters=adapters)


class VLLMBackend:
    """A model served by vLLM (see the module docstring). ``open`` starts the server without waiting for it."""

    name = "vllm"

    def __init__(self, server: VLLMServer, tokenizer_dir: Path):
        self.server = server
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer = None
        self.model_name = ADAPTER_NAME if server.adapters else server.name
        self._owned = False

    @classmethod
    def open(cls, handle: "ModelHandle", ctx: "RunContext | None" = None, **overrides: Any) -> "VLLMBackend":
        options = options_for(handle.runtime, handle.path, **overrides)
        if ctx is not None:
            server = ctx.engine(handle.path, options, lambda log: make_server(handle.path, options, log))
            backend = cls(server, adapter_base(handle.path)[0])
        else:
            backend = cls(make_server(handle.path, options, None).start(), adapter_base(handle.path)[0])
            backend._owned = True
        return backend

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:  # servers of a run are closed by the run
            self.server.close()

    def ready(self) -> "VLLMBackend":
        if self.server.ready_s is None:
            self.server.wait_ready()
        return self

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        limit = self.server.options.max_model_len
        if prompt_tokens + new_tokens > limit:
            raise RecipeError(
                f"{where}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the vLLM server's "
                f"max_model_len ({limit}). Fix: lower `prompt_tokens` or `new_tokens`."
            )
        self.ready()

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        return prompt_ids(self.tokenizer, batch, tokens)

    def param_bytes(self) -> int | None:
        return self.ready().server.model_memory_bytes()

    def memory(self) -> dict[str, Any]:
        s = self.ready().server
        return {"load_s": round(s.ready_s, 3), "peak_rss_bytes": s.peak_rss_bytes,
                "model_memory_bytes": s.model_memory_bytes(), "what": "server process tree, RSS sampled every 0.2 s; "
                "load_s = process start to /health answering (import + engine start)"}

    def describe(self) -> dict[str, Any]:
        o = self.server.options
        return {"engine": f"vllm {self.version() or '?'}", "batching": "continuous (concurrent streamed requests)",
                "device": o.device, "dtype": o.dtype, "threads": o.threads, "enforce_eager": o.enforce_eager,
                "prefix_caching": o.prefix_caching, "max_model_len": o.max_model_len,
                **({"kv_cache_gib": o.kv_cache_gib} if o.device != "cuda" else
                   {"gpu_memory_utilization": o.gpu_memory_utilization}),
                **({"tensor_parallel_size": o.tensor_parallel_size} if o.tensor_parallel_size > 1 else {}),
                **({"lora": ADAPTER_NAME} if self.server.adapters else {})}

    def version(self) -> str | None:
        log = self.server.log_path
        if log is None or not Path(log).is_file():
            return None
        found = re.search(r"LLM engine \(v([^)]+)\)", Path(log).read_text(errors="replace"))
        return found.group(1) if found else None

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        from ..serving.client import run_batch

        self.ready()
        timings, wall = run_batch(self.server.url, self.model_name, prompt_ids, new_tokens,
                                  api_key=self.server.options.api_key)
        first = max(t.token_s[0] for t in timings)  # every sequence has its first token
        last = max(t.token_s[-1] for t in timings)
        return GenTiming(
            batch_size=len(prompt_ids), prompt_tokens=len(prompt_ids[0]), new_tokens=new_tokens, ttft_s=first,
            decode_s=last - first, total_s=wall, ttfts_s=tuple(t.ttft_s for t in timings),
            itls_s=tuple(x for t in timings for x in t.itl_s),
        )

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        from ..serving.client import stream_chat

        self.ready()
        yield from stream_chat(self.server.url, self.model_name, messages, max_tokens=max_new_tokens,
                               api_key=self.server.options.api_key, **sampling)
