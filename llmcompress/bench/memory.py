"""Load time and memory of one model, measured in a fresh Python process so models never share a high-water mark.

    python -m llmcompress.bench.memory <folder> --device cpu --dtype bfloat16 --threads 1

The child imports torch and transformers, records its RSS (the base), loads the model (timed), records RSS again,
runs one short greedy generate, and prints one JSON line. Peak RSS is the kernel's high-water mark of the child's own
address space (``VmHWM``): ``ru_maxrss`` is not used on Linux because a child started by fork/vfork + exec inherits
the parent's peak there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import LLMCompressError
from ..utils.memory import peak_rss_bytes, rss_bytes
from ..utils.proc import die_with_parent

MODULE = "llmcompress.bench.memory"


def measure_memory(
    path: str | Path, device: str = "cpu", dtype: str = "bfloat16", threads: int = 1,
    prompt_tokens: int = 16, new_tokens: int = 4, timeout_s: float = 900, module: str = MODULE,
    args: list[str] | None = None,
) -> dict[str, Any]:
    """Run the probe in a fresh process; return its JSON. Raises LLMCompressError naming the folder and the fix.

    ``module``/``args``: another probe with the same command line and JSON (the vision probe and its flags).
    """
    cmd = [sys.executable, "-m", module, str(path), "--device", device, "--dtype", dtype, "--threads", str(threads)]
    cmd += args if args is not None else ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s,
                              preexec_fn=die_with_parent())
    except subprocess.TimeoutExpired:
        raise LLMCompressError(
            f"benchmark: the memory probe of `{path}` ran over {timeout_s:.0f} s. "
            f"Fix: run `{' '.join(cmd[1:])}` by hand to see where it hangs, or set `memory: false`."
        ) from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:]) or "(no output)"
        raise LLMCompressError(
            f"benchmark: the memory probe of `{path}` failed (exit {proc.returncode}):\n{tail}\n"
            f"Fix: check that the folder loads with llmcompress.models.loading.load_model, "
            f"or set `memory: false` to skip this measurement."
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise LLMCompressError(
            f"benchmark: the memory probe of `{path}` printed no JSON (stdout: {proc.stdout[-300:]!r})."
        ) from None


def measure_loaded(path: str | Path, device: str, dtype: str, threads: int,
                   workload: Callable[[Any, Any], tuple[str, dict]]) -> dict:
    """Base RSS, a timed ``load_model``, RSS after the load, then ``workload(model, tokenizer_or_processor)`` (which
    returns its key and figures for the JSON) and the high-water mark. Imports that belong to the base come first."""
    import torch

    from ..models.loading import load_model

    torch.set_num_threads(threads)
    base = rss_bytes()
    t0 = time.perf_counter()
    model, processor = load_model(path, device, dtype)
    load_s = time.perf_counter() - t0
    after_load = rss_bytes()
    key, figures = workload(model, processor)
    out = {
        "path": str(path), "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
        "load_s": round(load_s, 4), "rss_base_bytes": base, "rss_load_bytes": after_load,
        "peak_rss_bytes": peak_rss_bytes(), key: figures,
    }
    if device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def probe(path: str | Path, device: str, dtype: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Load ``path`` in this process and measure it. Meant for a fresh process (``python -m``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imported before the base RSS

    from ..backends.hf import HFBackend

    def generate(model, tokenizer) -> tuple[str, dict]:
        backend = HFBackend(model, tokenizer, device)
        timing = backend.generate(backend.prompts(1, prompt_tokens), new_tokens)
        return "generate", {"batch_size": 1, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                            "total_s": round(timing.total_s, 4)}

    return measure_loaded(path, device, dtype, threads, generate)


def probe_parser(module: str, doc: str, path_help: str, dtype: str) -> argparse.ArgumentParser:
    """The command line every probe shares (folder, device, dtype, threads); each adds its workload's flags."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("path", help=path_help)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=dtype, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    return parser


def folder_problem(module: str, path: Path) -> str | None:
    """The message for a path that is not a model folder, or None."""
    if (path / "config.json").is_file():
        return None
    what = "does not exist" if not path.exists() else "has no config.json"
    return f"{module}: `{path}` {what}. Fix: pass a model folder written by save_pretrained."


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(MODULE, __doc__, "a model folder (save_pretrained layout, or one llmcompress wrote)",
                          "bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    path = Path(args.path)
    problem = folder_problem(MODULE, path)
    if problem is None and (args.threads < 1 or args.prompt_tokens < 1 or args.new_tokens < 2):
        problem = f"{MODULE}: --threads and --prompt-tokens must be >= 1 and --new-tokens >= 2."
    if problem:
        print(problem, file=sys.stderr)
        return 2
    result = probe(path, args.device, args.dtype, args.threads, args.prompt_tokens, args.new_tokens)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
