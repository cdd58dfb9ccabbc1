"""Recipe rules of the vision families, checked when the recipe loads (no weights, no torch): a vision model or VLM
with a setting it cannot take is refused with the place and the fix (``models.family.check_recipe`` asks)."""

from __future__ import annotations

from typing import Any

#: Quantization methods that work on vision models, and the layers each one quantizes.
VISION_QUANT_LAYERS = {
    "rtn": "Linear + Conv2d",
    "dynamic-int8": "Linear",
    "bnb-nf4": "Linear",
    "bnb-fp4": "Linear",
    "bnb-int8": "Linear",
    "hqq": "Linear",
    "torchao-int8wo": "Linear",
    "torchao-int8dq": "Linear",
    "torchao-int4wo": "Linear",
}
VISION_PRUNE = ("magnitude", "structured")
#: What a VLM's language part supports (its vision tower stays dense); the rest is refused, not guessed.
VLM_QUANT = ("rtn", "dynamic-int8", "bnb-nf4", "bnb-fp4", "bnb-int8", "hqq", "torchao-int8wo", "torchao-int8dq")
VLM_STAGES = ("quantize", "prune", "evaluate", "benchmark")
_EVAL_LLM_ONLY = ("tasks", "limit", "num_fewshot", "perplexity", "backend", "vllm", "chat", "apply_chat_template",
                  "fewshot_as_multiturn", "system_instruction", "log_samples")
_BENCH_LLM_ONLY = ("prompt_tokens", "new_tokens", "vllm")


def _explicit(stage: Any, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in stage.model_fields_set]


def vision_problem(stage: Any, task: str | None) -> str | None:
    """What is wrong with ``stage`` on a vision model (an LLM-only setting), or None."""
    t = stage.type
    if t == "distill":
        return ("the distill stage trains a language model on a teacher's next-token log-probs. Fix: remove it; a "
                "vision model recovers with `{type: lora, data: {source: builtin:digits, split: train}}`.")
    if t == "quantize" and stage.method not in VISION_QUANT_LAYERS:
        return (f"`{stage.method}` calibrates a causal LM on text and does not apply to vision models. "
                f"Fix: use one of {', '.join(VISION_QUANT_LAYERS)}.")
    if t == "prune" and stage.method not in VISION_PRUNE:
        return (f"`{stage.method}` scores weights with text activations of a causal LM. Fix: use "
                f"`magnitude` (unstructured or N:M) or `structured` (removes MLP channels) on a vision model.")
    if t == "evaluate":
        bad = _explicit(stage, _EVAL_LLM_ONLY)
        if bad:
            return (f"{_keys(bad)} {'is' if len(bad) == 1 else 'are'} for language models; a vision model is "
                    "evaluated on images. Fix: remove it and set `data: {source: builtin:digits, samples: null}` "
                    "(top-1/top-5 accuracy, or mAP for detection, plus KL vs the original).")
        return _data_task(stage.data, task)
    if t == "benchmark":
        bad = _explicit(stage, _BENCH_LLM_ONLY)
        if bad or "vllm" in stage.backends:
            return (f"{_keys(bad) if bad else '`backends: [vllm]`'} applies to text generation. Fix: remove it; a "
                    "vision model is timed on images (`batch_sizes`, `repeats`, `warmup`, `memory`, `compare`).")
    if t == "lora":
        from .data import ImageDataConfig

        if "data" in stage.model_fields_set and not isinstance(stage.data, ImageDataConfig):
            return ("a vision model fine-tunes on images, and `data` names text. Fix: set "
                    "`data: {source: builtin:digits, split: train}` (or `imagefolder:<path>`).")
        if stage.generate is not None:
            return "`generate` makes text with a language model. Fix: remove it."
        if stage.accelerate.launches:
            return ("vision LoRA trains in one process (`accelerate` with several processes or FSDP is wired for "
                    "language models only). Fix: remove `accelerate.num_processes` / `accelerate.fsdp`.")
        return _data_task(stage.data, task) if isinstance(stage.data, ImageDataConfig) else None
    if t == "export" and stage.format != "hf":
        return (f"`format: {stage.format}` writes a language model for its runtime. Fix: use `format: hf` "
                "(a save_pretrained folder; `dequantize: true` for rtn/hqq/dynamic-int8 layouts).")
    return None


def _data_task(data: Any, task: str | None) -> str | None:
    if data is None or task is None or data.task is None or data.task == task:
        return None
    fix = "builtin:digits-detect" if task == "object-detection" else "builtin:digits"
    return f"`data.source: {data.source}` is {data.task} data, and the model is an {task} model. Fix: use `{fix}`."


def vlm_problem(stage: Any, task: str | None) -> str | None:
    """What is wrong with ``stage`` on a VLM beyond what an LLM refuses (``Family.problem``), or None."""
    if stage.type not in VLM_STAGES:
        return (f"the {stage.type} stage is not supported on vision-language models yet (only "
                f"{', '.join(VLM_STAGES)}, on the language part). Fix: remove it.")
    if stage.type == "quantize" and stage.method not in VLM_QUANT:
        return (f"`{stage.method}` runs a causal LM's calibration and cannot load a vision-language model. "
                f"Fix: use one of {', '.join(VLM_QUANT)} (the vision tower and projector stay dense).")
    if stage.type == "prune" and stage.method != "magnitude":
        return f"`{stage.method}` is not supported on vision-language models. Fix: use `magnitude`."
    if stage.type == "evaluate" and getattr(stage, "backend", "hf") == "vllm":
        return "`backend: vllm` is not supported for vision-language models here. Fix: use `backend: hf`."
    if stage.type == "benchmark" and "vllm" in stage.backends:
        return "`backends: [vllm]` is not supported for vision-language models here. Fix: use `[hf]`."
    return None


def _keys(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)
