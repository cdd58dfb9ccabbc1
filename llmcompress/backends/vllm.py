"""The vLLM backend: a model folder served by vLLM in its own process, driven over its OpenAI HTTP API.

A batch of B prompts is B concurrent streamed requests (continuous batching, as a server sees traffic), so time to
first token and inter-token latency are per request, as clients see them. Within a run one server per model folder
and settings is started once and reused by every stage (``RunContext.engine``), and stopped when the run ends.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..serving.server import ServerOptions, VLLMServer
from ..serving import support
from ..serving.support import adapter_base, max_lora_rank, require_servable
from .served import ServedBackend, max_len  # noqa: F401 - max_len: also imported from here

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext, Runtime

ADAPTER_NAME = "adapter"


def options_for(runtime: "Runtime", path: Path, **overrides: Any) -> ServerOptions:
    """Server settings that match the run's: same device, dtype, threads and seed."""
    base = dict(device=runtime.device, dtype=runtime.dtype, threads=runtime.threads, seed=runtime.seed,
                max_model_len=max_len(path))
    return ServerOptions(**{**base, **overrides})


def make_server(path: str | Path, options: ServerOptions, log_path: Path | None, name: str = "model") -> VLLMServer:
    """A (not yet started) server for a model folder, with its LoRA adapter when the folder is base + adapter.

    Raises ``serving.support.Unservable`` with the reason and the fix when vLLM cannot serve the folder here.
    """
    require_servable(path, options.device, "vLLM cannot serve this model here", dtype=options.dtype)
    base, adapter = adapter_base(path)
    adapters = {ADAPTER_NAME: adapter} if adapter is not None else {}
    if adapter is not None:
        options = ServerOptions(**{**options.__dict__, "max_lora_rank": max_lora_rank(adapter)})
    return VLLMServer(model=base, options=options, log_path=log_path, name=name, adapters=adapters)


class VLLMBackend(ServedBackend):
    """A model served by vLLM (see the module docstring). ``open`` starts the server without waiting for it."""

    name = "vllm"
    title = "vLLM"
    server_label = "the vLLM server"

    def __init__(self, server: VLLMServer, tokenizer_dir: Path):
        super().__init__(server, tokenizer_dir, ADAPTER_NAME if server.adapters else server.name)

    @classmethod
    def preflight(cls, where: str) -> None:
        """vLLM installed (here or in `llmcompress setup vllm`'s environment), else the error with the fix."""
        from ..serving.runtime import vllm_python

        vllm_python(where)

    @classmethod
    def unservable(cls, handle: "ModelHandle") -> str | None:
        """Why vLLM cannot serve the model here (with the fix), or None: a quick check of the folder, before any
        server starts."""
        why = support.unservable_reason(handle.path, handle.runtime.device, handle.runtime.dtype)
        return None if why is None else f"vLLM cannot serve this model here: {why}"

    @classmethod
    def bench_settings(cls, stage: Any, runtime: "Runtime", n_models: int) -> dict[str, Any]:
        """Server settings of a benchmark stage's vLLM engines (``bench.stage.vllm_overrides``)."""
        from ..bench.stage import vllm_overrides

        return vllm_overrides(stage.vllm, runtime.device, n_models)

    @classmethod
    def server(cls, path: str | Path, log_path: Path | None, name: str = "model", **settings: Any) -> VLLMServer:
        """A (not yet started) server for a model folder with ``settings`` (``ServerOptions`` fields), for
        ``llmcompress serve``; ``Unservable`` when vLLM cannot serve the folder here."""
        return make_server(path, ServerOptions(**settings), log_path, name=name)

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

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        limit = self.server.options.max_model_len
        if prompt_tokens + new_tokens > limit:
            raise RecipeError(
                f"{where}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the vLLM server's "
                f"max_model_len ({limit}). Fix: lower `prompt_tokens` or `new_tokens`."
            )
        self.ready()

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
