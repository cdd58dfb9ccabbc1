"""What every backend that drives a server process over an OpenAI-compatible HTTP API shares (vllm, llamacpp).

A batch of B prompts is B concurrent streamed requests (continuous batching, as a server sees traffic), so time to
first token and inter-token latency are per request, as clients see them. Within a run one server per model and
settings is started once (``RunContext.engine``) and stopped when the run ends; a backend opened without a run owns
its server and stops it on ``close``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .base import GenTiming
from .prompts import prompt_ids


def max_len(path: Path, cap: int = 2048) -> int:
    """Tokens a server gives one sequence: the model's ``max_position_embeddings`` (config.json), at most ``cap``."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return min(cap, int(config.get("max_position_embeddings") or cap))
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):  # unreadable: the engine's own default
        return cap


class ServedBackend:
    """A model behind a server (``server``: a started ``serving.server.VLLMServer`` or subclass); ``model_name``:
    the name requests use. Subclasses add ``open``, ``check`` and ``describe``."""

    name = "served"
    #: What the app's messages call the engine and its server ("vLLM", "the vLLM server").
    title = "server"
    server_label = "the server"
    #: Extra fields of every timed completion request (e.g. llama-server's ``cache_prompt``).
    request_params: dict[str, Any] = {}

    def __init__(self, server: Any, tokenizer_dir: Path, model_name: str):
        self.server, self.tokenizer_dir, self.model_name = server, tokenizer_dir, model_name
        self._tokenizer = None
        self._owned = False

    def __enter__(self) -> "ServedBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:  # servers of a run are closed by the run
            self.server.close()

    def ready(self) -> "ServedBackend":
        if self.server.ready_s is None:
            self.server.wait_ready()
        return self

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        return self._tokenizer

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        return prompt_ids(self.tokenizer, batch, tokens)

    def param_bytes(self) -> int | None:
        return self.ready().server.model_memory_bytes()

    def memory(self) -> dict[str, Any]:
        s = self.ready().server
        return {"load_s": round(s.ready_s, 3), "peak_rss_bytes": s.peak_rss_bytes,
                "model_memory_bytes": s.model_memory_bytes(), "what": "server process tree, RSS sampled every 0.2 s; "
                "load_s = process start to /health answering (import + engine start)"}

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        from ..serving.client import run_batch

        self.ready()
        timings, wall = run_batch(self.server.url, self.model_name, prompt_ids, new_tokens,
                                  api_key=self.server.options.api_key, **self.request_params)
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
