"""Load time and memory of one vision model, in a fresh Python process (the LLM probe's twin for images).

    python -m llmcompress.vision.memory <folder> --device cpu --dtype float32 --threads 1 --batch-size 8

Imports torch and transformers, records RSS (the base), loads the model (timed), records RSS again, runs one forward
on ``batch_size`` digit images and prints one JSON line with the kernel's high-water mark (``VmHWM``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MODULE = "llmcompress.vision.memory"


def probe(path: str | Path, device: str, dtype: str, threads: int, batch_size: int) -> dict:
    import transformers  # noqa: F401 - imported before the base RSS

    from ..bench.memory import measure_loaded
    from .bench import batch_inputs, forward

    def run_forward(model, processor) -> tuple[str, dict]:
        x = batch_inputs(model, processor, [batch_size])[batch_size]
        t = time.perf_counter()
        forward(model, x)
        return "forward", {"batch_size": batch_size, "seconds": round(time.perf_counter() - t, 4)}

    return measure_loaded(path, device, dtype, threads, run_forward)


def main(argv: list[str] | None = None) -> int:
    from ..bench.memory import folder_problem, probe_parser

    parser = probe_parser(MODULE, __doc__, "a vision model folder", "float32")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    path = Path(args.path)
    problem = folder_problem(MODULE, path)
    if problem is None and (args.threads < 1 or args.batch_size < 1):
        problem = f"{MODULE}: --threads and --batch-size must be >= 1."
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print(json.dumps(probe(path, args.device, args.dtype, args.threads, args.batch_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
