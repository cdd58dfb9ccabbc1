"""lm-eval tasks on an in-memory model: the local tasks in ``llmcompress/evals/`` (offline) or, with hub access, any
lm-eval task.

Offline, a task that is not local fails at once (no minutes of hub retries). The TaskManager is built once per process:
over the rendered local tasks only (fast), or with lm-eval's own tasks too (~12 s) when a hub task is asked for.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

from ..errors import LLMCompressError, RecipeError
from ..registry import did_you_mean
from .tasks import EVALS_ENV, evals_dir, local_tasks, render_include_dir

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
#: Bootstrap draws for the stderr of metrics that have no closed form (lm-eval's default, 100k, takes minutes).
BOOTSTRAP_ITERS = 1000
#: Keys of lm-eval's results that map task names to values: merged when tasks run one ``simple_evaluate`` call each.
_PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
             "samples")
#: What lm-eval's CLI records of the prompt format (its ``GeneralConfigTracker``), kept in our results JSON too.
_CHAT_FIELDS = ("system_instruction", "system_instruction_sha", "fewshot_as_multiturn", "chat_template",
                "chat_template_sha")


@dataclass(frozen=True)
class PromptOptions:
    """lm-eval's prompt and logging options, passed to ``simple_evaluate`` as they are."""

    apply_chat_template: bool | str = False  # True: the tokenizer's chat template; a string: one of its named templates
    fewshot_as_multiturn: bool = False  # few-shot examples as user/assistant turns (only with a chat template)
    system_instruction: str | None = None  # a system message (with a template), else text before each prompt
    log_samples: bool = False  # per-sample documents, prompts, outputs and metrics in the results ("samples")


# ---------------------------------------------------------------------------------------------------------------------
# Task names and hub access


def hub_offline_reason() -> str | None:
    """Why lm-eval's built-in tasks cannot fetch data now (an offline variable, or no connection in 2 s), else None."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    return _unreachable(host, port)


@functools.lru_cache(maxsize=8)
def _unreachable(host: str, port: int, timeout: float = 2.0) -> str | None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.__class__.__name__}: {e})"
    return None


def check_tasks(tasks: Sequence[str], where: str = "evaluate") -> None:
    """Fail at once, before any model loads, on unknown task names and on hub tasks while the hub is offline.

    Local names are checked against the local tasks (``evals_dir()``); other names need the hub, so offline they fail
    here in <= 2 s.
    Online, lm-eval's full index (built once, ~12 s) is the authority.
    """
    local = sorted(local_tasks())
    others = [t for t in tasks if t not in local]
    if not others:
        return
    local_list = ", ".join(local) or f"none (no task YAMLs in {evals_dir()})"

    def unknown(name: str, choices: list[str]) -> RecipeError:
        return RecipeError(
            f"{where}: unknown task `{name}`.{did_you_mean(name, choices)} Local tasks: {local_list}. "
            "With hub access any lm-eval task name works (see `lm_eval ls tasks`)."
        )

    reason = hub_offline_reason()
    if reason is not None:
        for name in others:
            if did_you_mean(name, local):  # most likely a typo of a local task
                raise unknown(name, local)
        raise RecipeError(
            f"{where}: `{others[0]}` is not a local task (local tasks: {local_list}), and lm-eval's own tasks "
            f"download their data from the Hugging Face hub, which is offline ({reason}). Fix: use a local task, "
            f"point {EVALS_ENV} to a folder of task YAMLs with local data (now {evals_dir()}), or run where the hub "
            "is reachable (with HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset)."
        )
    known = set(task_manager(tasks).all_tasks)
    for name in others:
        if name not in known:
            raise unknown(name, sorted(known | set(local)))


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: Sequence[str]):
    """A TaskManager that knows ``tasks``: local ones only (fast), or lm-eval's too (~12 s once per process)."""
    local = local_tasks()
    include_defaults = any(t not in local for t in tasks)
    return _task_manager(str(render_include_dir()), include_defaults)


# ---------------------------------------------------------------------------------------------------------------------
# Running


def clean_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{task: {"acc,none": 0.4, "alias": ..}}`` -> ``{task: {"acc": 0.4}}``: finite numbers only, ",none" dropped.

    lm-eval's ``sample_len`` (items scored) becomes ``samples``, the name reports treat as a count, not a score.
    """
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            key = key[: -len(",none")] if key.endswith(",none") else key
            clean["samples" if key == "sample_len" else key] = float(value)
        out[task] = clean
    return out


@contextmanager
def _lean_lm_eval(quiet: bool) -> Iterator[None]:
    """Skip what lm-eval adds to every result that we record ourselves, and keep its output off our progress bars.

    ``add_env_info`` runs ``pip list`` and friends (~1.3 s a call); ``get_git_commit_hash`` runs ``git describe`` in the
    working directory (printing "fatal: not a git repository" outside one). When ``quiet``, lm-eval's tqdm bars and
    warnings go to a buffer, replayed on stderr if the evaluation fails.
    """
    import io
    import logging
    import sys
    from contextlib import ExitStack, redirect_stderr
    from unittest import mock

    import lm_eval.evaluator as evaluator

    logger = logging.getLogger("lm_eval")
    level = logger.level
    buffer = io.StringIO()
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(evaluator, "add_env_info", lambda results: None))
        stack.enter_context(mock.patch.object(evaluator, "get_git_commit_hash", lambda: None))
        logger.setLevel(logging.ERROR if quiet else logging.WARNING)
        if quiet:
            stack.enter_context(redirect_stderr(buffer))
        try:
            yield
        except BaseException:
            sys.__stderr__.write(buffer.getvalue()[-4000:])
            raise
        finally:
            logger.setLevel(level)


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    progress: Callable[..., None] | None = None,
    options: PromptOptions = PromptOptions(),
) -> dict[str, dict[str, float]]:
    """Evaluate a loaded model on lm-eval tasks; returns ``{task: {metric: value}}`` (e.g. ``{"acc": .41}``).

    The arguments are those of ``evaluate_tasks``, whose full results this cleans.
    """
    return clean_results(evaluate_tasks(model, tokenizer, tasks, limit, num_fewshot, batch_size, progress,
                                        options)["results"])


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    progress: Callable[..., None] | None = None,
    options: PromptOptions = PromptOptions(),
) -> dict[str, Any]:
    """Evaluate a loaded model on lm-eval tasks; returns lm-eval's own results (what ``simple_evaluate`` returns:
    ``results``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ...; ``samples`` with
    ``options.log_samples``), JSON-ready, plus the prompt-format fields lm-eval's CLI records (``chat_template``, ...).

    Args:
        model, tokenizer: an in-memory transformers model and its tokenizer.
        tasks: local task names (``llmcompress/evals/``) or, with hub access, any lm-eval task.
        limit: items per task (the first N of its test split); None for all.
        num_fewshot: few-shot examples per item (tasks that fix it to 0, like perplexity, keep 0).
        batch_size: lm-eval batch size.
        progress: called with 1 after each task (our progress bar); lm-eval's own output is hidden when given.
        options: chat template, system instruction, per-sample logging.
    """
    check_tasks(tasks)
    if options.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise LLMCompressError(
            f"evaluate: `apply_chat_template: {options.apply_chat_template}`, but the tokenizer of "
            f"{getattr(tokenizer, 'name_or_path', None) or 'this model'} has no chat template. Fix: set "
            "`apply_chat_template: false`, or use a model whose tokenizer has one (tokenizer_config.json "
            "`chat_template`)."
        )
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks)
    runs: list[dict[str, Any]] = []
    tracker = EvaluationTracker()  # records the chat template and system instruction as lm-eval's CLI does
    with _lean_lm_eval(quiet=progress is not None):
        # A model another engine runs (llama.cpp's GGUF) brings its own lm-eval LM; transformers models use HFLM.
        lm = (model.lm_eval_model(tokenizer, batch_size) if hasattr(model, "lm_eval_model")
              else HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size))
        for task in tasks:  # one at a time, so the progress bar moves per task
            runs.append(simple_evaluate(
                lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                bootstrap_iters=BOOTSTRAP_ITERS, evaluation_tracker=tracker, **asdict(options),
            ))
            if progress is not None:
                progress(1)
    tracked = asdict(tracker.general_config_tracker)
    return merge_results(runs, {k: tracked.get(k) for k in _CHAT_FIELDS})


def merge_results(runs: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """lm-eval's results of one ``simple_evaluate`` call per task as one, as JSON-ready as lm-eval writes it
    (its ``handle_non_serializable``: numpy numbers become numbers, anything else its ``str``)."""
    from lm_eval.utils import handle_non_serializable

    out: dict[str, Any] = {}
    for run in runs:
        for key, value in run.items():
            if key in _PER_TASK and isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out.setdefault(key, value)  # model config, seeds, date, tokenizer: the same for every task
    out.update(extra or {})
    return json.loads(json.dumps(out, default=handle_non_serializable))
