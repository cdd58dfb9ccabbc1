"""Codebook (k-means, SqueezeLLM-style) quantization against uniform round-to-nearest at matched bits per weight
(issue 20), on the default model, in one invocation; writes benchmarks/results/codebook.json.

Each entry is one quantize stage followed by the same evaluate stages: perplexity, KL and top-1 agreement against the
original on the first `--eval-tokens` tokens of Python's docs and of tinyshakespeare (benchmarks/texts.py; windows of
512, stride 256). Calibration (Fisher / activation weighting) reads builtin:mixed after token 20,000 of Python's docs
(and text the original model wrote), never the evaluated windows; Shakespeare is never calibrated on.
Bits per weight of the quantized layers are counted from the saved files (every tensor of those layers: indices +
codebooks, or packed integers + scales + zero points), so both sides are charged what they store.
Runs are kept under benchmarks/runs/codebook/<entry> and resumed.

    python benchmarks/codebook.py [--eval-tokens 4096] [--only cb4-fisher,rtn4-g64]

`--model PATH` runs the entries on another model folder (e.g. the default model with its Q4_1 grid dithered away,
benchmarks/dither_model.py): its runs go under benchmarks/runs/codebook/<folder name>/, its figures into
benchmarks/results/codebook-<folder name>.json.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import typer
from ladder import collect, n_params  # benchmarks/ladder.py: the figures of a run, the model's parameter count
from texts import eval_texts  # benchmarks/texts.py

app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs" / "codebook"
RESULT = ROOT / "benchmarks" / "results" / "codebook.json"
CALIB = {"source": "builtin:mixed", "samples": 16, "seq_len": 256, "skip_tokens": 20000}
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.")


def cb(bits: int, weighting: str) -> dict:
    return {"type": "quantize", "method": "codebook", "bits": bits, "group_size": None, "weighting": weighting,
            "calibration": CALIB, "iterations": 20}


def rtn(bits: int, group: int) -> dict:
    return {"type": "quantize", "method": "rtn", "bits": bits, "group_size": group}


#: name -> stage, in the order measured (the pairs first, so a cut-short run still compares like with like)
ENTRIES: dict[str, dict] = {
    "cb4-fisher": cb(4, "fisher"), "rtn4-g64": rtn(4, 64),
    "cb3-fisher": cb(3, "fisher"), "rtn3-g96": rtn(3, 96),
    "cb4-none": cb(4, "none"), "cb3-none": cb(3, "none"),
    "rtn4-g48": rtn(4, 48), "rtn3-g64": rtn(3, 64),
    "cb3-activation": cb(3, "activation"), "cb4-activation": cb(4, "activation"),
}


def recipe(name: str, stage: dict, texts: dict[str, Path], threads: int, model: str = "smollm2-135m") -> dict:
    evals = [{"type": "evaluate", "name": domain, "tasks": [], "kl": True,
              "perplexity": {"corpus": str(path), "ctx_len": 512, "stride": 256, "max_tokens": 100_000}}
             for domain, path in texts.items()]
    return {"name": f"codebook-{name}", "model": model, "threads": threads, "stages": [stage, *evals]}


def layer_bits(folder: Path) -> dict:
    """Bytes the quantized layers store, from the saved files, and the bits per weight they make."""
    from safetensors import safe_open

    stored = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if QUANTIZED.match(key):
                    t = st.get_tensor(key)
                    stored += t.numel() * t.element_size()
    return {"layer_bytes": stored}


def quantized_weights(folder: Path | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcompress.models.builtin import smollm2_135m

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder or smollm2_135m())))
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and QUANTIZED.match(n + "."))


@app.command()
def main(eval_tokens: int = 4096, only: str = "", threads: int = 1, model: Path = None,
         calibration: str = "builtin:mixed") -> None:
    """`--calibration builtin:pydoc` avoids generating builtin:mixed's text with another `--model` (minutes)."""
    from llmcompress.pipeline import run_recipe
    from llmcompress.recipe import load_recipe

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    t0 = time.perf_counter()
    RUNS.mkdir(parents=True, exist_ok=True)
    texts = eval_texts(RUNS, eval_tokens)
    model = model.resolve() if model else None
    runs = RUNS / model.name if model else RUNS
    result_file = RESULT.with_name(f"codebook-{model.name}.json") if model else RESULT
    weights, params = quantized_weights(model), n_params(model)
    previous = json.loads(result_file.read_text())["entries"] if result_file.is_file() else {}
    entries = dict(previous)
    names = [n for n in ENTRIES if not only or n in only.split(",")]
    for name in names:
        run = runs / name
        t1 = time.perf_counter()
        stage = ENTRIES[name]
        if "calibration" in stage:
            stage = {**stage, "calibration": {**stage["calibration"], "source": calibration}}
        try:
            run_recipe(load_recipe(recipe(name, stage, texts, threads, str(model or "smollm2-135m"))), run,
                       show_progress=False)
        except Exception as e:  # record and go on: one entry must not lose the others
            entries[name] = {"error": f"{type(e).__name__}: {e}"[:500], "stage": stage}
            print(f"{name}: FAILED {entries[name]['error']}")
            continue
        out = collect(run, texts)
        out.update(layer_bits(run / "01-quantize" / "model"))
        out["layer_bits_per_weight"] = round(out["layer_bytes"] * 8 / weights, 4)
        out["model_bits_per_weight"] = round(out["size_bytes"] * 8 / params, 4)
        q = json.loads((run / "01-quantize" / "result.json").read_text())["result"]["data"]
        out["quantize_seconds"] = q["quantize_seconds"]
        out["reported_bits_per_weight"] = q.get("bits_per_weight")
        out["stage"] = stage
        out["entry_seconds"] = round(time.perf_counter() - t1)
        entries[name] = out
        print(name, json.dumps({k: out[k] for k in ("layer_bits_per_weight", "size_bytes")}),
              {d: round(out[d]["compressed"], 3) for d in texts if d in out})
        _save(result_file, model, entries, eval_tokens, texts, weights, params, threads, t0, calibration)
    _save(result_file, model, entries, eval_tokens, texts, weights, params, threads, t0, calibration)


def _save(result_file: Path, model: Path | None, entries: dict, eval_tokens: int, texts: dict, weights: int,
          params: int, threads: int, t0: float, calibration: str) -> None:
    result = {"date": time.strftime("%Y-%m-%d"), "model": str(model) if model else "smollm2-135m",
              "eval_tokens": eval_tokens,
              "domains": list(texts), "params": params, "quantized_weights": weights,
              "calibration": {**CALIB, "source": calibration},
              "threads": threads, "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
              "wall_s": round(time.perf_counter() - t0),
              "entries": {n: entries[n] for n in ENTRIES if n in entries}}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app()
