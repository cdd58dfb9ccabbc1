"""Decode speed of lowrank-factorized models against the original, measured alternately so that load from other
processes on a shared CPU hits every model alike (benchmarks/lowrank.py measures each model once, in turn, and its
tok/s moved by 3x between two runs on this 2-core machine). Speed depends on the shapes only, so the factors come
from plain SVD (fast); writes benchmarks/results/lowrank-decode.json.

    python benchmarks/lowrank_decode.py [--targets 0.1,0.2] [--rounds 5]
"""

from __future__ import annotations

import json
import os
import statistics
import time

import typer
from lowrank import NEW, PROMPT, ROOT, decode_tok_s, factorized

app = typer.Typer(add_completion=False)
RESULT = ROOT / "benchmarks" / "results" / "lowrank-decode.json"


@app.command()
def main(targets: str = "0.1,0.2", rounds: int = 5):
    import torch

    torch.set_num_threads(1)
    from llmcompress.models.builtin import smollm2_135m
    from llmcompress.models.loading import load_model

    t_all = time.perf_counter()
    original, tok = load_model(smollm2_135m(), "cpu", "float32")
    models = {"original": original}
    for target in [float(t) for t in targets.split(",")]:
        models[f"-{target:.0%}"] = factorized(original, tok, target, False, None)[0]
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            speeds[name].append(decode_tok_s(model, repeats=1))
    median = {name: statistics.median(v) for name, v in speeds.items()}
    result = {"model": "smollm2-135m", "threads": 1, "dtype": "float32", "batch": 1, "prompt_tokens": PROMPT,
              "new_tokens": NEW, "rounds": rounds, "tok_s": speeds, "median_tok_s": median,
              "median_x_original": {n: round(m / median["original"], 3) for n, m in median.items()},
              "seconds": round(time.perf_counter() - t_all, 1)}
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
