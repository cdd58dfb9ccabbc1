"""Hugging Face folder -> GGUF with llama.cpp's own converter, and the original's F16 GGUF, cached.

``convert_hf_to_gguf.py`` (from the llama.cpp that ``setup llamacpp`` built) writes tensor names, rope layout,
tokenizer (with llama.cpp's pre-tokenizer, found by hashing the tokenizer's output) and chat template as llama.cpp
expects them; we never re-implement it. Architectures it does not know are refused before any weights load.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

from ..errors import LLMCompressError, RecipeError
from ..utils.io import read_config
from . import runtime


@lru_cache(maxsize=4)
def supported_architectures(src: str) -> frozenset[str]:
    """The ``architectures`` names the converter registers (``@ModelBase.register("LlamaForCausalLM", ...)``)."""
    names: set[str] = set()
    files = [Path(src) / "convert_hf_to_gguf.py", *sorted((Path(src) / "conversion").glob("*.py"))]
    for f in files:
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", f.read_text(errors="replace")):
            names.update(re.findall(r"\"([A-Za-z0-9_]+)\"", args))
    return frozenset(names)


def dense_format(model_dir: Path) -> str | None:
    """None for a dense save_pretrained folder (what the converter reads), else what it is instead: our format name
    (rtn, peft, ...) or "quantized transformers" (config.json has a ``quantization_config``)."""
    from ..models.loading import read_meta

    fmt = read_meta(Path(model_dir)).get("format", "hf")
    if fmt != "hf":
        return fmt
    config = Path(model_dir) / "config.json"
    return "quantized transformers" if config.is_file() and "quantization_config" in read_config(config) else None


def check_convertible(model_dir: Path, where: str) -> None:
    """RecipeError unless llama.cpp's converter knows the folder's architecture (read from config.json)."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return  # not materialized yet (a builtin model before its first load): the converter itself will say
    archs = read_config(cfg_file).get("architectures") or []
    known = supported_architectures(str(runtime.source_dir(runtime.require(where))))
    if not archs or not any(a in known for a in archs):
        raise RecipeError(
            f"{where}: llama.cpp {runtime.LLAMA_CPP_COMMIT}'s converter does not support the architecture "
            f"{archs or '(none in config.json)'} of `{model_dir}`, so no GGUF can be made of it. Fix: use another "
            "method (gptq, hqq, torchao-int4wo, ...) or a model llama.cpp supports (Llama, Mistral, Qwen, Gemma, ...)."
        )


def to_gguf(model_dir: Path, out_file: Path, outtype: str = "f16", log_path: Path | None = None) -> Path:
    """Convert a dense save_pretrained folder into one GGUF file (``outtype``: f16, bf16, f32 or q8_0)."""
    check_convertible(model_dir, "gguf conversion")
    cmd, env = runtime.converter("gguf conversion")
    return _convert([*cmd, str(model_dir)], env, model_dir, out_file, outtype, log_path)


def lora_to_gguf(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16",
                 log_path: Path | None = None) -> Path:
    """A peft LoRA adapter -> a GGUF LoRA adapter (llama.cpp's ``convert_lora_to_gguf.py``; the base folder gives
    the config and tokenizer, not weights)."""
    check_convertible(base_dir, "LoRA adapter conversion")
    cmd, env = runtime.converter("LoRA adapter conversion")
    cmd = [cmd[0], str(Path(cmd[1]).with_name("convert_lora_to_gguf.py")), str(adapter_dir), "--base", str(base_dir)]
    return _convert(cmd, env, adapter_dir, out_file, outtype, log_path)


def _convert(cmd: list[str], env: dict, source: Path, out_file: Path, outtype: str, log_path: Path | None) -> Path:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".partial")
    tmp.unlink(missing_ok=True)
    proc = subprocess.run([*cmd, "--outfile", str(tmp), "--outtype", outtype], capture_output=True, text=True,
                          env=env)
    output = proc.stdout + proc.stderr
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(output)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(line for line in output.splitlines() if "Writing:" not in line)[-1500:]
        raise LLMCompressError(
            f"llama.cpp's {Path(cmd[1]).name} failed on `{source}` (exit {proc.returncode}):\n{tail}\n"
            f"Fix: {'see ' + str(log_path) if log_path else 'run it by hand to see why'}; the model must be a dense "
            "Hugging Face folder of an architecture llama.cpp supports."
        )
    tmp.replace(out_file)
    return out_file


def f16_of(model_dir: Path, fingerprint: str) -> Path:
    """The F16 GGUF of a dense folder (the original), converted once and cached by its fingerprint."""
    return _cached(f"{Path(model_dir).name}-{fingerprint}", "model-f16.gguf",
                   lambda target, log: to_gguf(model_dir, target, "f16", log_path=log))


def lora_gguf_of(adapter_dir: Path, base_dir: Path, fingerprint: str) -> Path:
    """The GGUF LoRA adapter of a peft adapter folder, converted once and cached by its fingerprint."""
    return _cached(f"lora-{Path(adapter_dir).parent.name}-{fingerprint}", "adapter-f16.gguf",
                   lambda target, log: lora_to_gguf(adapter_dir, base_dir, target, "f16", log_path=log))


def _cached(folder: str, name: str, convert) -> Path:
    """``<cache>/gguf/<folder>/<name>``, made by ``convert(target, log)`` once (locked: sweep workers share it)."""
    from ..utils.cache import cache_dir
    from ..utils.io import file_lock

    target = cache_dir("gguf", folder, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name("convert.lock")):
        if not target.is_file():
            convert(target, target.with_name("convert.log"))
    return target
