"""The llamacpp backend: a GGUF file served by llama-server, driven over its OpenAI HTTP API like the vllm backend.

What it runs: a folder of ours in ``gguf`` format runs its own ``model.gguf``; a dense Hugging Face folder (the
original, a pruned model) runs as llama.cpp's F16 conversion of it, made once and cached — the llama.cpp baseline a
user would start from. Folders llama.cpp cannot read (GPTQ, bnb, torchao, ...) raise ``Unservable`` and are listed,
not timed. A batch of B prompts is B concurrent streamed requests on B server slots (continuous batching).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..serving.support import Unservable
from ..backends.served import ServedBackend, max_len
from . import runtime
from .server import LlamaServer, LlamaServerOptions

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext


def gguf_for(handle: "ModelHandle") -> tuple[Path, str, tuple[str, ...]]:
    """``(GGUF file, what it is, GGUF LoRA adapters)`` llama.cpp runs for a model folder; ``Unservable`` when there
    is none. A base + LoRA folder (``merge: keep``) runs as its base with the adapter converted to a GGUF adapter."""
    from .convert import check_convertible, dense_format, f16_of, lora_gguf_of
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
    other = dense_format(path)
    if other is not None:
        raise Unservable(f"`{path}` is a {other} folder; llama.cpp runs GGUF files. Fix: quantize with "
                         "`method: gguf`, or export it with `format: gguf`.")
    try:
        check_convertible(path, "the llamacpp backend")
    except RecipeError as e:
        raise Unservable(str(e)) from None
    return f16_of(path, handle.fingerprint()), "F16 GGUF (llama.cpp's conversion of the dense folder)", ()


class LlamaCppBackend(ServedBackend):
    """A GGUF model under llama-server (see the module docstring)."""

    name = "llamacpp"
    title = "llama.cpp"
    server_label = "llama-server"
    #: The rounds repeat their prompts: a slot would skip the prefill it already holds (prompt cache) and flatter TTFT.
    request_params = {"cache_prompt": False}

    def __init__(self, server: LlamaServer, tokenizer_dir: Path, what: str):
        super().__init__(server, tokenizer_dir, server.name)
        self.what = what

    @classmethod
    def preflight(cls, where: str) -> None:
        runtime.require(where)

    @classmethod
    def bench_settings(cls, stage: Any, runtime: Any, n_models: int) -> dict[str, Any]:
        """Server settings for a benchmark: a slot per request of the largest batch, each long enough for one."""
        return {"parallel": max(stage.batch_sizes), "slot_ctx": stage.prompt_tokens + stage.new_tokens + 8}

    @classmethod
    def open(cls, handle: "ModelHandle", ctx: "RunContext | None" = None, **overrides: Any) -> "LlamaCppBackend":
        runtime.require("the llamacpp backend")
        gguf, what, lora = gguf_for(handle)
        base = {"threads": handle.runtime.threads, "seed": handle.runtime.seed, "lora": lora,
                "slot_ctx": max_len(handle.path)}
        options = LlamaServerOptions(**{**base, **overrides})
        if ctx is not None:
            server = ctx.engine(gguf, options, lambda log: LlamaServer(model=gguf, options=options, log_path=log,
                                                                       name=handle.role), kind="llama-server")
            backend = cls(server, handle.path, what)
        else:
            backend = cls(LlamaServer(model=gguf, options=options, name=handle.role).start(), handle.path, what)
            backend._owned = True
        return backend

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        limit = self.server.options.slot_ctx
        if prompt_tokens + new_tokens > limit:
            raise RecipeError(f"{where}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds "
                              f"llama-server's context per slot ({limit}). Fix: lower `prompt_tokens` or `new_tokens`.")
        self.ready()

    def describe(self) -> dict[str, Any]:
        o = self.server.options
        return {"engine": f"llama.cpp {runtime.LLAMA_CPP_COMMIT} llama-server", "model": self.what,
                "batching": f"continuous ({o.parallel} slots of {o.slot_ctx} tokens)", "threads": o.threads,
                "flash_attention": "auto (llama.cpp's default: on for CPU)",
                **({"lora": list(o.lora)} if o.lora else {})}
