"""lm-eval tasks through vLLM: lm-eval's own ``vllm`` model type on a model folder, in the vLLM environment.

vLLM cannot share this environment (see ``llmcompress.serving``), so lm-eval runs in a child process of the vLLM
Python (``serving/lm_eval_entry.py``), on the same rendered local tasks, and its results come back as JSON (lm-eval's
own results, as ``harness.evaluate_tasks`` returns them in-process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import LLMCompressError
from ..utils.proc import die_with_parent
from .harness import BOOTSTRAP_ITERS, PromptOptions, check_tasks
from .tasks import local_tasks, render_include_dir

if TYPE_CHECKING:
    from ..context import Runtime
    from ..serving.config import VLLMConfig

ENTRY = Path(__file__).resolve().parents[1] / "serving" / "lm_eval_entry.py"


def model_args(path: Path, runtime: "Runtime", config: "VLLMConfig") -> dict[str, Any]:
    """lm-eval ``vllm`` model_args for a folder (a base + LoRA folder becomes pretrained + lora_local_path)."""
    from ..backends.served import max_len
    from ..serving.support import adapter_base, max_lora_rank

    base, adapter = adapter_base(path)
    args: dict[str, Any] = {
        "pretrained": str(base), "dtype": runtime.dtype, "seed": runtime.seed, "enforce_eager": config.enforce_eager,
        "max_model_len": config.max_model_len or max_len(base), "tensor_parallel_size": config.tensor_parallel_size,
        "max_num_seqs": config.max_num_seqs,  # lm-eval 0.4.13 hands extra model_args on to vllm.LLM
    }
    if config.pipeline_parallel_size > 1:
        args["pipeline_parallel_size"] = config.pipeline_parallel_size
    if runtime.device == "cuda":
        args["gpu_memory_utilization"] = config.gpu_memory_utilization
    if adapter is not None:
        args.update(lora_local_path=str(adapter), max_lora_rank=max_lora_rank(adapter))
    return args


def needs_hub(tasks: Sequence[str]) -> bool:
    """Whether lm-eval needs its own tasks, whose data comes from the hub (any name that is not a local task)."""
    return any(t not in local_tasks() for t in tasks)


def child_env(runtime: "Runtime", config: "VLLMConfig", tasks: Sequence[str]) -> dict[str, str]:
    """The lm-eval child's environment: vLLM's (offline), but online when a task downloads its data from the hub
    (``check_tasks`` has checked the hub is reachable by then)."""
    from ..serving.server import ServerOptions

    options = ServerOptions(device=runtime.device, threads=runtime.threads, kv_cache_gib=config.kv_cache_gib,
                            tensor_parallel_size=config.tensor_parallel_size)
    env = {**os.environ, **options.env(), **options.engine_env()}  # on one CPU worker: vllm.LLM all in this child
    if needs_hub(tasks):
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.pop(var, None)
    return env


def run_tasks_vllm(
    path: Path, runtime: "Runtime", config: "VLLMConfig", tasks: Sequence[str], limit: int | None,
    num_fewshot: int, batch_size: int, log_path: Path, where: str = "evaluate", timeout_s: float = 3600,
    options: PromptOptions = PromptOptions(),
) -> dict[str, Any]:
    """Evaluate the folder ``path`` on lm-eval tasks with vLLM; returns lm-eval's results (``results``: ``{task:
    {"acc,none": ..}}``, ``configs``, ``versions``, ...; ``harness.clean_results`` reads the figures)."""
    from ..serving.runtime import vllm_python
    from ..serving.support import require_servable

    check_tasks(tasks, where=where)
    python = vllm_python(where)
    require_servable(path, runtime.device, f"{where}: vLLM cannot evaluate this model here", dtype=runtime.dtype)
    env = child_env(runtime, config, tasks)
    with tempfile.TemporaryDirectory(prefix="llmcompress-lmeval-") as tmp:
        spec = {
            "model_args": model_args(path, runtime, config), "tasks": list(tasks), "limit": limit,
            "num_fewshot": num_fewshot, "batch_size": batch_size, "include_path": str(render_include_dir()),
            "include_defaults": needs_hub(tasks), "bootstrap_iters": BOOTSTRAP_ITERS,
            "output": str(Path(tmp) / "results.json"), **asdict(options),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {python} {ENTRY} {json.dumps(spec)}\n".encode())
            log.flush()
            proc = subprocess.Popen([python, str(ENTRY), str(Path(tmp) / "spec.json")], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=die_with_parent(signal.SIGTERM))
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise LLMCompressError(f"{where}: lm-eval under vLLM ran over {timeout_s:.0f} s. "
                                       f"Fix: lower `limit`, or read {log_path}.") from None
            finally:  # vLLM's engine processes share the child's session: none may outlive it (or a Ctrl-C)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        if proc.returncode != 0:
            lines = log_path.read_text(errors="replace").splitlines()
            tail = "\n".join([ln for ln in lines if "Error" in ln][-6:] or lines[-8:])
            raise LLMCompressError(f"{where}: lm-eval under vLLM failed (exit {proc.returncode}):\n{tail}\n"
                                   f"Fix: read the whole log in {log_path}.")
        return json.loads((Path(tmp) / "results.json").read_text())
