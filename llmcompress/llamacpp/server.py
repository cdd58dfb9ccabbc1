"""llama-server in a child process: the process handling (start, /health, process-group shutdown, RSS sampling) is
``serving.process.ServerProcess``'s, as for vLLM; this is llama-server's command line.

``parallel`` slots of ``slot_ctx`` tokens each (continuous batching across slots), so a benchmark batch of B
concurrent requests runs B at once when ``parallel >= B``. The API key, when set, goes through $LLAMA_API_KEY (never
the command line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..serving.process import KeyedOptions, ServerProcess
from . import runtime


@dataclass(frozen=True)
class LlamaServerOptions(KeyedOptions):
    threads: int = 1
    parallel: int = 1
    slot_ctx: int = 2048
    seed: int = 0
    lora: tuple[str, ...] = ()  # GGUF LoRA adapters applied to every request
    extra_args: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)

    def args(self) -> list[str]:
        out = ["-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel),
               "-c", str(self.parallel * self.slot_ctx), "--seed", str(self.seed), "--no-webui", "--jinja"]
        for adapter in self.lora:
            out += ["--lora", adapter]
        return out + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.api_key:
            env["LLAMA_API_KEY"] = self.api_key
        return env


@dataclass(eq=False)
class LlamaServer(ServerProcess):
    """One llama-server for one GGUF file (``model``)."""

    options: LlamaServerOptions = field(default_factory=LlamaServerOptions)
    label = "llama-server"
    key_env = "LLAMA_API_KEY"
    log_name = "llama-server's log"

    def command(self) -> list[str]:
        binary = runtime.tool("llama-server", "the llamacpp backend")
        return [str(binary), "-m", str(self.model), "--alias", self.name, "--host", self.host, "--port",
                str(self.port), *self.options.args()]

    def start_fix(self) -> str:
        return "run `llmcompress setup llamacpp --force` to rebuild llama.cpp"

    def model_memory_bytes(self) -> int | None:
        """The "model buffer size" lines llama.cpp logs while loading (mapped plus repacked weights) when its log
        level shows them, else the GGUF files it maps (model and adapters): the weights it holds in memory."""
        found = re.findall(r"model buffer size = +([0-9.]+) MiB", self.log_text() or "")
        if found:
            return int(sum(float(x) for x in found) * 2**20)
        files = [Path(self.model), *map(Path, self.options.lora)]
        return sum(f.stat().st_size for f in files if f.is_file()) or None
