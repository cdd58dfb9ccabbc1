"""The ``ray`` executor: each recipe a Ray task with its CPU/GPU/memory request; results gathered back as they finish.

- ``address: null`` starts a local cluster for the sweep (``ray.init`` with this machine's cores) and stops it after.
- ``address: auto`` / ``HOST:6379`` joins a cluster started with ``ray start``; ``ray://HOST:10001`` uses Ray client.

CPU workers are reused between recipes (imports are paid once); GPU tasks, or every task with ``fresh_process: true``,
get a new process whose memory all goes back when the recipe ends. A task that fails for
a reason other than bad input (a crash, a lost node, out of memory) is submitted again up to ``retries`` times and
resumes from its last finished stage; bad input (LLMCompressError) is reported at once. Nothing is lost: every task
ends as an outcome the leaderboard lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import MissingExtraError, RecipeError, require
from .config import RayExecutorConfig

AUTH_MODE = "RAY_AUTH_MODE"


def _task(job: dict) -> dict:
    """What a Ray worker runs (module level, so workers import it by name rather than unpickling code)."""
    from .worker import run_point

    return run_point(job)


class RayExecutor:
    """Runs the jobs as Ray tasks; see the module docstring."""

    def __init__(self, config: RayExecutorConfig, console: Any, show_progress: bool = True):
        self.config, self.console = config, console
        self.cluster: dict[str, Any] = {}

    def describe(self) -> dict:
        c = self.config
        return {"type": "ray", "address": c.address or "local cluster", "num_cpus": c.num_cpus, "num_gpus": c.num_gpus,
                "memory_gib": c.memory_gib, "retries": c.retries, "max_concurrent": c.max_concurrent,
                "cluster": self.cluster}

    @staticmethod
    def preflight() -> None:
        """MissingExtraError, naming the fix, when Ray is not installed (the sweep checks before writing anything)."""
        require("ray", "ray", "The ray sweep executor")

    def run(self, jobs: list[dict], on_done: Callable[[dict], None]) -> list[dict]:
        self.preflight()
        set_auth = _token_auth_for(self.config)  # before the import: Ray reads its settings when it loads
        ray = None
        try:
            ray = _import_ray()
            self._connect(ray)
            self._check_fits(ray)
            return self._gather(ray, jobs, on_done)
        finally:
            if ray is not None:
                ray.shutdown()  # stops the local cluster this sweep started; only disconnects from a remote one
            if set_auth:
                os.environ.pop(AUTH_MODE, None)

    # -----------------------------------------------------------------------------------------------------------------

    def _connect(self, ray: Any) -> None:
        import logging

        c = self.config
        kwargs: dict[str, Any] = {"runtime_env": c.runtime_env, "log_to_driver": False,
                                  "logging_level": logging.WARNING, "ignore_reinit_error": False}
        if c.local:
            kwargs.update(address="local", num_cpus=c.local_cpus or os.cpu_count() or 1, num_gpus=c.local_gpus,
                          object_store_memory=c.object_store_mib * 2**20, include_dashboard=False)
            where = "a local Ray cluster"
        else:
            kwargs["address"] = c.address
            where = f"the Ray cluster at {c.address}"
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(**{k: v for k, v in kwargs.items() if v is not None})
        except Exception as e:  # noqa: BLE001 - connection, auth and address errors come in many types
            chain = [e, e.__cause__, e.__context__]
            auth = any("authentication" in f"{type(x).__name__} {x}".lower() for x in chain if x is not None)
            fix = ("copy the cluster's token to ~/.ray/auth_token (or set RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token"
                   if auth else "start it with `ray start --head` (then `address: auto`), check the address, or "
                   "leave `address` empty to start a local cluster")
            first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise RecipeError(f"executor: could not connect to {where} ({first}). Fix: {fix}.") from None
        resources = ray.cluster_resources()
        self.cluster = {"address": c.address or "local", "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                        "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0),
                        "memory_gib": round(resources.get("memory", 0) / 2**30, 1)}
        self.console.log(f"ray: {where}: {self.cluster['nodes']} node(s), {self.cluster['cpus']:g} CPU, "
                         f"{self.cluster['gpus']:g} GPU; each recipe asks for {c.num_cpus:g} CPU, {c.num_gpus:g} GPU"
                         + (f", {c.memory_gib:g} GiB" if c.memory_gib else ""))

    def _check_fits(self, ray: Any) -> None:
        """A request no node can meet would wait forever: say so now."""
        c = self.config
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        need = {"CPU": c.num_cpus, "GPU": c.num_gpus, "memory": (c.memory_gib or 0) * 2**30}
        if any(all(node.get(k, 0) >= v for k, v in need.items() if v) for node in nodes):
            return
        best = {k: max((node.get(k, 0) for node in nodes), default=0) for k in need}
        raise RecipeError(
            f"executor: each recipe asks for {c.num_cpus:g} CPU, {c.num_gpus:g} GPU"
            + (f", {c.memory_gib:g} GiB" if c.memory_gib else "")
            + f", and no node of the cluster has that (largest: {best['CPU']:g} CPU, {best['GPU']:g} GPU, "
            f"{best['memory'] / 2**30:.1f} GiB). Fix: lower `num_cpus`/`num_gpus`/`memory_gib`, or add a node "
            "that has them."
        )

    def _gather(self, ray: Any, jobs: list[dict], on_done: Callable[[dict], None]) -> list[dict]:
        c = self.config
        options: dict[str, Any] = {"num_cpus": c.num_cpus, "num_gpus": c.num_gpus, "max_retries": 0}
        if c.memory_gib:
            options["memory"] = int(c.memory_gib * 2**30)
        if c.fresh_process is not None:
            options["max_calls"] = 1 if c.fresh_process else 0
        # Resources go to ray.remote itself: that is where Ray decides that a GPU task gets a new process.
        remote = ray.remote(**options)(_task)
        queue = list(jobs)
        pending: dict[Any, tuple[dict, int]] = {}
        outcomes: list[dict] = []

        def submit(job: dict, attempt: int) -> None:
            ref = remote.options(name=f"llmcompress:{job['name']}").remote(job)
            pending[ref] = (job, attempt)

        try:
            while queue or pending:
                while queue and (c.max_concurrent is None or len(pending) < c.max_concurrent):
                    submit(queue.pop(0), 1)
                ready, _ = ray.wait(list(pending), num_returns=1)
                job, attempt = pending.pop(ready[0])
                outcome = self._outcome(ray, ready[0], job)
                outcome["attempts"] = attempt
                if outcome["status"] != "done" and outcome.get("error_kind") != "input" and attempt <= c.retries:
                    self.console.log(f"ray: {job['name']} failed ({outcome['error']}); retrying "
                                     f"({attempt}/{c.retries}), it resumes from its last finished stage")
                    submit(job, attempt + 1)
                    continue
                on_done(outcome)
                outcomes.append(outcome)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return outcomes

    @staticmethod
    def _outcome(ray: Any, ref: Any, job: dict) -> dict:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:  # the worker died (OOM, segfault, lost node) or the task was cancelled
            text = str(e).strip().splitlines()
            return {"name": job["name"], "run_dir": job["run_dir"], "status": "failed", "error_kind": "runtime",
                    "error": f"{type(e).__name__}: {text[0] if text else ''}"[:500]}


def _token_auth_for(config: RayExecutorConfig) -> bool:
    """Ray 2.60 enables token auth for clusters `ray start` runs, but a driver joining one sends no token unless
    RAY_AUTH_MODE=token is set (even with the token in ~/.ray/auth_token): set it for the connection when a token is
    at hand and the user chose no mode. Returns whether it was set here."""
    if config.local or AUTH_MODE in os.environ:
        return False
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return False
    os.environ[AUTH_MODE] = "token"
    return True


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError("ray", "ray", "The ray sweep executor") from None
    return ray
