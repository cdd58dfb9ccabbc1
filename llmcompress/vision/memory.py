"""Load time and memory of one vision model, in a fresh Python process (the LLM probe's twin for images).

    python -m llmcompress.vision.memory <folder> --device cpu --dtype float32 --threads 1 --batch-size 8

Imports torch and transformers, records RSS (the base), loads the model (timed), records RSS again, runs one forward
on ``batch_size`` digit images and prints one JSON line with the kernel's high-water mark (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODULE = "llmcompress.vision.memory"


def probe(path: str | Path, device: str, dtype: str, threads: int, batch_size: int) -> dict:
    import torch
    import transformers  # noqa: F401 - imported before the base RSS

    from ..bench.memory import peak_rss_bytes, rss_bytes
    from ..models.loading import load_model
    from .bench import batch_inputs, forward

    torch.set_num_threads(threads)
    base = rss_bytes()
    t0 = time.perf_counter()
    model, processor = load_model(path, device, dtype)
    load_s = time.perf_counter() - t0
    after_load = rss_bytes()
    x = batch_inputs(model, processor, [batch_size])[batch_size]
    t = time.perf_counter()
    forward(model, x)
    out = {"path": str(path), "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
           "load_s": round(load_s, 4), "rss_base_bytes": base, "rss_load_bytes": after_load,
           "peak_rss_bytes": peak_rss_bytes(),
           "forward": {"batch_size": batch_size, "seconds": round(time.perf_counter() - t, 4)}}
    if device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a vision model folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    path = Path(args.path)
    if not (path / "config.json").is_file():
        print(f"{MODULE}: `{path}` has no config.json. Fix: pass a model folder written by save_pretrained.",
              file=sys.stderr)
        return 2
    if args.threads < 1 or args.batch_size < 1:
        print(f"{MODULE}: --threads and --batch-size must be >= 1.", file=sys.stderr)
        return 2
    print(json.dumps(probe(path, args.device, args.dtype, args.threads, args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
