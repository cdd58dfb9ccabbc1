"""Cost target: how long a method takes to quantize the default model (target: GPTQ in under a minute on 2 cores).

Runs only the quantize stage of a method recipe, fresh, once per thread count, and writes the timings to
benchmarks/results/quantize_cost-<recipe>.json. The machine is shared: the load average is recorded with every figure.

    python benchmarks/quantize_cost.py recipes/smollm2-gptq4.yaml --threads 1 --threads 2
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import typer
import yaml

app = typer.Typer(add_completion=False)
RESULTS = Path(__file__).resolve().parent / "results"


def quantize_only(recipe_path: Path, threads: int) -> dict:
    from llmcompress import load_recipe, run_recipe

    raw = yaml.safe_load(recipe_path.read_text())
    raw["stages"] = [s for s in raw["stages"] if s.get("type") in ("prune", "quantize")]
    raw["threads"] = threads
    recipe = load_recipe(raw)  # (relative data paths in the recipe resolve against the working directory)
    with tempfile.TemporaryDirectory(prefix="llmcompress-bench-") as out:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        run_recipe(recipe, out, fresh=True, show_progress=False)
        wall = time.perf_counter() - t0
        stages = sorted(Path(out).glob("*/result.json"))
        results = [json.loads(p.read_text())["result"] for p in stages]  # {fingerprint, config, result}
    quant = [r for r in results if r["type"] in ("prune", "quantize")][-1]
    return {
        "threads": threads,
        "quantize_seconds": quant["data"].get("quantize_seconds") or quant["data"].get("prune_seconds"),
        "stage_seconds": round(quant["seconds"], 2),
        "run_wall_seconds": round(wall, 2),
        "load_average_before": round(load0, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


@app.command()
def main(recipe: Path, threads: list[int] = typer.Option([1, 2], help="torch thread counts to time"),
         target_seconds: float = typer.Option(60.0, help="the cost target")) -> None:
    rows = [quantize_only(recipe, t) for t in threads]
    best = min(r["quantize_seconds"] for r in rows)
    out = {"recipe": recipe.name, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "runs": rows, "best_seconds": best,
           "target_seconds": target_seconds, "target_met": best < target_seconds}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantize_cost-{recipe.stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{recipe.stem}: threads={r['threads']} quantize {r['quantize_seconds']:.1f} s "
              f"(stage {r['stage_seconds']:.1f} s, load avg {r['load_average_before']})")
    print(f"best {best:.1f} s vs target {target_seconds:.0f} s: {'met' if out['target_met'] else 'NOT met'}")


if __name__ == "__main__":
    app()
