"""Issue 20 on a GPU: the prune-distill recipe's healing at 1x, 2x, 4x, 8x... its 2-core CPU budget, in one run.

The recipe heals for 20 minutes on 2 CPU cores (495,616 tokens on an AMX Xeon). "How does the figure move with 2x and
4x the budget" costs hours there and minutes on a GPU. This runs `recipes/smollm2-prune-distill.yaml`'s stages with
`device: cuda` and the distill budget set in tokens (multiples of the CPU run's), each followed by the ladder's
evaluation (perplexity and KL on the first 4,096 tokens of Python's docs and of tinyshakespeare) and, for the first,
decode at batch 1 against the original. The prune stages are run once and reused (hard links). At the end a fresh
process loads the last healed folder with plain transformers and recomputes its Python-docs perplexity.

    python benchmarks/gpu_heal_budget.py --texts DIR --budgets 1,2,4,8 --out OUT [--time-limit-s 420]

DIR holds eval-pydoc.txt and eval-shakespeare.txt (benchmarks/runs/ladder/ writes them; tinyshakespeare is beside the
checkout, not in it). OUT gets gpu_heal_budget.json after every run (so a run cut short still reports) and the runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import typer
from ladder import RECIPE_TOKENS, collect, recipe, seed_run, with_distill  # benchmarks/ is on sys.path

app = typer.Typer(add_completion=False)
RECIPE = "recipes/smollm2-prune-distill.yaml"

FRESH_CHECK = r"""
import json, math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], open(sys.argv[2]).read()
tok = AutoTokenizer.from_pretrained(folder)
device = sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:4096])
total, scored, done = 0.0, 0, 1
for begin in range(0, len(ids), 256):  # the evaluate stage's windows: 512 tokens, stride 256, each token scored once
    end = min(begin + 512, len(ids))
    if end > done:
        first = max(done, begin + 1)
        with torch.inference_mode():  # the last n + 1 positions' logits, as the stage computes them
            logits = model(input_ids=ids[begin:end][None].to(device), use_cache=False,
                           logits_to_keep=end - first + 1).logits[0, :-1].float().cpu()
        lp = torch.log_softmax(logits, -1)
        total -= lp.gather(-1, ids[first:end, None]).sum().item()
        scored += end - first
        done = end
    if end == len(ids):
        break
print(json.dumps({"perplexity": math.exp(total / scored), "tokens": scored,
                  "layers": model.config.num_hidden_layers, "intermediate_size": model.config.intermediate_size,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


@app.command()
def main(texts: Path = typer.Option(..., help="Folder with eval-pydoc.txt and eval-shakespeare.txt."),
         out: Path = typer.Option(..., help="Where the runs and gpu_heal_budget.json go."),
         budgets: str = typer.Option("1,2,4,8", help="Multiples of the CPU run's 495,616 healing tokens."),
         time_limit_s: float = typer.Option(420, help="Start no further budget after this many seconds."),
         device: str = typer.Option("cuda", help="cuda; cpu or auto only to try the script (with --smoke)."),
         threads: int = typer.Option(8, help="torch CPU threads (part of the stages' fingerprints)."),
         smoke: bool = typer.Option(False, help="A few healing windows only: checks the script, measures nothing.")
         ) -> None:
    from llmcompress import load_recipe, run_recipe

    t0 = time.perf_counter()
    evals = {d: texts / f"eval-{d}.txt" for d in ("pydoc", "shakespeare")}
    result: dict = {"device": gpu_name() if device == "cuda" else "cpu", "recipe": RECIPE, "cpu_tokens": RECIPE_TOKENS,
                    "runs": {}}
    out.mkdir(parents=True, exist_ok=True)
    first_run: Path | None = None
    for i, k in enumerate(float(b) for b in budgets.split(",")):
        if time.perf_counter() - t0 > time_limit_s:
            result["stopped"] = f"time limit {time_limit_s:.0f} s reached before budget {k:g}x"
            break
        name = f"heal-{k:g}x"
        stages = with_distill(RECIPE, budget={"tokens": int(k * RECIPE_TOKENS)})
        if smoke:
            stages = [{**s, "data": [{**d, "samples": 4} for d in s["data"]], "held_out": {**s["held_out"],
                       "tokens": 256}} if s["type"] == "distill" else s for s in stages]
        rec = recipe("prune-distill", stages, False, evals, threads, None)  # the ladder's evaluations (+ decode b1)
        if i:  # decode timed once, on the first
            rec["stages"] = [s for s in rec["stages"] if s["type"] != "benchmark"]
        rec.update(name=name, device=device)
        run = out / name
        if first_run is not None:  # the same two prune stages: reuse them (a stage's fingerprint is its inputs)
            seed_run(run, name, sorted(first_run.glob("0[12]-prune")))
        t = time.perf_counter()
        run_recipe(load_recipe(rec), run, show_progress=False)
        entry = collect(run, evals)
        entry["wall_s"] = round(time.perf_counter() - t, 1)
        entry["prune_s"] = {f.name: json.loads((f / "result.json").read_text())["result"]["seconds"]
                            for f in sorted(run.glob("0[12]-prune"))}
        result["runs"][name] = entry
        first_run = first_run or run
        healing = entry.get("healing", {})
        print(f"{name}: pydoc {entry['pydoc']['compressed'] / entry['pydoc']['original']:.3f}x "
              f"shakespeare {entry['shakespeare']['compressed'] / entry['shakespeare']['original']:.3f}x "
              f"tokens {healing.get('tokens_trained')} in {healing.get('minutes')} min", flush=True)
        (out / "gpu_heal_budget.json").write_text(json.dumps(result, indent=1))
    last = out / list(result["runs"])[-1] if result["runs"] else None
    if last is not None:  # a fresh process, plain transformers: the folder computes what the run measured
        folder = sorted(last.glob("0[0-9]-distill"))[-1] / "model"
        check = subprocess.run([sys.executable, "-c", FRESH_CHECK, str(folder), str(evals["pydoc"]),
                                "cuda" if device == "cuda" else "cpu"],
                               capture_output=True, text=True, timeout=300)
        result["fresh_check"] = {"folder": str(folder.relative_to(out)), "run": last.name,
                                 **(json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0
                                    else {"error": check.stderr[-2000:]})}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_heal_budget.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    app()
