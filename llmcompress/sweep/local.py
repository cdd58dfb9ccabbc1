"""The ``local`` executor: the recipes one after the other in this process, with progress bars on the console."""

from __future__ import annotations

from typing import Any, Callable

from .config import LocalExecutorConfig
from .worker import run_point


class LocalExecutor:
    """Sequential and resumable: the sweep skips finished recipes before it gets here; a re-run recipe resumes from
    its last finished stage. A recipe that fails is reported and the next one starts."""

    def __init__(self, config: LocalExecutorConfig, console: Any, show_progress: bool = True):
        self.config, self.console, self.show_progress = config, console, show_progress

    def describe(self) -> dict:
        return {"type": "local", "retries": self.config.retries}

    def run(self, jobs: list[dict], on_done: Callable[[dict], None]) -> list[dict]:
        outcomes = []
        for n, job in enumerate(jobs, 1):
            for attempt in range(1, self.config.retries + 2):
                self.console.rule(f"[{n}/{len(jobs)}] {job['name']}" + (f" (attempt {attempt})" if attempt > 1 else ""))
                outcome = run_point(job, console=self.console, show_progress=self.show_progress)
                outcome["attempts"] = attempt
                if outcome["status"] == "done" or outcome.get("error_kind") == "input":
                    break
            on_done(outcome)
            outcomes.append(outcome)
        return outcomes
