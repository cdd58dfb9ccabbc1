"""A model server in a child process (vLLM's or llama-server): started on 127.0.0.1, waited for, and always shut down.

    with VLLMServer(folder, ServerOptions(dtype="float32")) as server:
        server.url  # http://127.0.0.1:<free port>; the OpenAI API is under {server.url}/v1

``ServerProcess`` holds what every server shares: the child runs in its own session (process group), so ``close()``
reaches the server and its children alike (vLLM's engine cores), even after the server itself died: SIGTERM to the
group, SIGKILL after a grace period. Servers still open when the interpreter exits are closed by an ``atexit`` hook.
The log goes to ``log_path``; the peak RSS of the process tree is sampled every 0.2 s; the API key goes to the child
through an environment variable (``key_env``), never its command line (which ``ps`` shows every user, and the log and
error messages quote). A subclass gives the command line (``command``), ``label``, ``start_fix`` and, when the
server logs it, ``model_memory_bytes``.
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

#: Seconds to wait for /health. Measured on a 2-core CPU box: 30-52 s for a 135M model under vLLM (import ~10 s +
#: engine init).
START_TIMEOUT_S = 600
_LIVE: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


class KeyedOptions:
    """What every server's options share: ``api_key``, the key clients must send (``Authorization: Bearer KEY``)."""

    api_key: str | None

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(_family(host)) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass(eq=False)
class ServerProcess:
    """One OpenAI-compatible server for ``model`` (a folder or a file) under the name ``name``."""

    model: Path
    options: Any = None
    log_path: Path | None = None
    name: str = "model"
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    started_at: float = field(default=0.0, init=False)
    ready_s: float | None = field(default=None, init=False)
    _peak_rss: int = field(default=0, init=False)
    _sampler: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    #: What the messages call this server.
    label = "server"
    #: The environment variable the server reads its API key from (an inherited one is dropped: it would lock our
    #: own clients out; the server has the key of its options).
    key_env = ""
    #: Whose log ``_log_hint`` says was not kept.
    log_name = "the server's log"

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start_fix(self) -> str:
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        """The child's environment: this one without an inherited API key, plus the options' ``env()``."""
        return {**{k: v for k, v in os.environ.items() if k != self.key_env}, **self.options.env()}

    def start(self) -> "ServerProcess":
        """Launch the child (returns at once; ``wait_ready`` blocks until it answers)."""
        if self.proc is not None:
            return self
        self.port = self.port or free_port(self.host)
        cmd = self.command()
        env = self.child_env()
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

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ServerProcess":
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

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_hint(self) -> str:
        if self.log_path is None:
            return f"start it with a `log_path` to keep {self.log_name} (this one was not kept)"
        return f"read the whole log in {self.log_path}"

    def log_text(self) -> str | None:
        """The server's log so far, or None when it was not kept."""
        if not self.log_path or not Path(self.log_path).is_file():
            return None
        return Path(self.log_path).read_text(errors="replace")

    def log_tail(self, lines: int = 12) -> str:
        text = self.log_text()
        if text is None:
            return "(no log)"
        errors = [ln for ln in text.splitlines() if re.search(r"Error|error:|ERROR", ln)]
        return "\n".join((errors or text.splitlines())[-lines:])

    def model_memory_bytes(self) -> int | None:
        """Bytes the loaded weights take, as the server reports them, if it does."""
        return None

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
        server's children are found after the server itself died."""
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
