"""Low-rank factorization on the default model (issue 20): SVD-LLM whitening against plain SVD at the same ranks (so
the same parameter count), at each `--targets` fraction of the parameters removed, all in one invocation; writes
benchmarks/results/lowrank.json.

Per variant: parameters, ranks, factorization seconds; perplexity on two held-out domains (the first `--eval-tokens`
tokens of Python's docs and of tinyshakespeare, windows of 512, no overlap); greedy decode tok/s at batch 1 on one
thread, with the original measured in the same run. Calibration (whitening only) is Python's docs past the first
`HELD_OUT` tokens, so it never sees an evaluated window; Shakespeare is a domain it never saw. Every model here runs in
float32 with the factors rounded to bfloat16, which is what the stage's folder stores (the original ships in bf16).
`--check-folder` also runs the real stage (`run_recipe`) at the largest target with whitening, then loads its folder
in a fresh process with `load_model` (logits compared with this run's in-memory variant) and with plain transformers
(which must refuse it).

    python benchmarks/lowrank.py [--targets 0.1,0.2] [--eval-tokens 3072] [--check-folder]
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from texts import eval_texts  # benchmarks/texts.py (this folder is on sys.path when run as a script)

app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "lowrank.json"
HELD_OUT = 8192  # calibration skips the first 8,192 tokens of Python's docs; the evaluation reads the first 3,072
CALIBRATION = {"source": "builtin:pydoc", "samples": 16, "seq_len": 256, "skip_tokens": HELD_OUT}
PROMPT, NEW = 32, 64


def perplexities(model, tok, texts: dict[str, Path], tokens: int) -> dict[str, float]:
    from llmcompress.eval.perplexity import PerplexityConfig, make_windows, perplexity

    cfg = PerplexityConfig(ctx_len=512, stride=512, max_tokens=tokens)
    return {name: round(perplexity(model, make_windows(tok, path.read_text(), cfg, name))["perplexity"], 3)
            for name, path in texts.items()}


def decode_tok_s(model, repeats: int = 2) -> float:
    """Greedy NEW tokens after a PROMPT-token random prompt, batch 1: the best of ``repeats`` (after a warm-up)."""
    import torch

    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=NEW, min_new_tokens=NEW)
    best = float("inf")
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, **kw)
            best = min(best, time.perf_counter() - t)
    return round(NEW / best, 2)


def round_to_bf16_(model) -> None:
    import torch

    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16).to(torch.float32)


def factorized(original, tok, target: float, whitening: bool, ids, damp: float = 0.01):
    """``(model, info)``: a copy of ``original`` through the lowrank stage's own planning and factorization."""
    from llmcompress.prune.lowrank import LowRankConfig
    from llmcompress.prune.lowrank_layers import factorize_model_
    from llmcompress.prune.lowrank_run import count_params, rank_summary

    cfg = LowRankConfig(target=target, whitening=whitening, calibration=CALIBRATION, damp=damp)
    model = copy.deepcopy(original)
    before = count_params(model)
    shapes = cfg.targets(model)
    ranks = cfg.plan(shapes, before)
    t = time.perf_counter()
    factorize_model_(model, ranks, ids if whitening else None, cfg.damp)
    seconds = time.perf_counter() - t
    round_to_bf16_(model)
    after = count_params(model)
    return model, {"target": target, "whitening": whitening, "damp": damp if whitening else None, "params": after,
                   "removed_share": 1 - after / before, "factorize_seconds": round(seconds, 1),
                   "ranks": rank_summary(ranks, shapes)}


FRESH = """
import json, sys, torch
torch.set_num_threads(1)
from llmcompress.models.loading import load_model
model, tok = load_model(sys.argv[1], "cpu", "float32")
with torch.no_grad():
    torch.save(model(**tok(sys.argv[3], return_tensors="pt")).logits, sys.argv[2])
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print(json.dumps({"plain_from_pretrained": "LOADED"}))
except Exception as e:
    print(json.dumps({"plain_from_pretrained": "refused: " + str(e)[:300]}))
"""


def check_folder(target: float, in_memory, tok, work: Path) -> dict:
    """The real stage at ``target`` with whitening; its folder loaded in a fresh process, and by plain transformers."""
    import torch

    from llmcompress.pipeline import run_recipe
    from llmcompress.recipe import load_recipe

    raw = {"name": "lowrank-check", "model": "smollm2-135m", "threads": 1, "dtype": "float32", "stages": [
        {"type": "prune", "method": "lowrank", "target": target, "calibration": CALIBRATION}]}
    run_recipe(load_recipe(raw), work / "run", show_progress=False)
    stage = json.loads((work / "run" / "report.json").read_text())["stages"][0]
    folder = next((work / "run").glob("01-*")) / "model"
    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    proc = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(work / "l.pt"), text],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    fresh = torch.load(work / "l.pt")
    with torch.no_grad():
        mine = in_memory(**tok(text, return_tensors="pt")).logits
    return {"stage_summary": stage["summary"], "size_bytes": stage["data"]["size_bytes"],
            "params_after": stage["data"]["params_after"],
            "fresh_load_model_vs_benchmark_max_abs_logit_diff": float((fresh - mine).abs().max()),
            "fresh_top1_agree": float((fresh.argmax(-1) == mine.argmax(-1)).float().mean()),
            **json.loads(proc.stdout.strip().splitlines()[-1])}


@app.command()
def main(targets: str = "0.1,0.2", eval_tokens: int = 3072, check: bool = typer.Option(False, "--check-folder"),
         damps: str = "0.01"):
    """`--damps 0.01,0.1`: whitening at each damping (the first is the stage's default and the one compared)."""
    import torch

    torch.set_num_threads(1)
    from llmcompress.data import CalibrationConfig, load_calibration
    from llmcompress.models.builtin import smollm2_135m
    from llmcompress.models.loading import load_model
    from llmcompress.prune.lowrank_run import count_params

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lowrank-bench-"))
    texts = eval_texts(work, eval_tokens)
    original, tok = load_model(smollm2_135m(), "cpu", "float32")
    ids = load_calibration(CalibrationConfig(**CALIBRATION), tok, None)
    rows = [{"variant": "original", "params": count_params(original),
             "perplexity": perplexities(original, tok, texts, eval_tokens), "decode_tok_s": decode_tok_s(original)}]
    print(json.dumps(rows[-1]), flush=True)
    kept = None
    for target in [float(t) for t in targets.split(",")]:
        damp_list = [float(d) for d in damps.split(",")]
        for whitening, damp in [(True, d) for d in damp_list] + [(False, damp_list[0])]:
            model, info = factorized(original, tok, target, whitening, ids, damp)
            info["perplexity"] = perplexities(model, tok, texts, eval_tokens)
            info["decode_tok_s"] = decode_tok_s(model)
            info["variant"] = f"{'svd-llm' if whitening else 'svd'} -{target:.0%}" + (
                f" damp {damp}" if whitening and damp != damp_list[0] else "")
            rows.append(info)
            print(json.dumps({k: v for k, v in info.items() if k != "ranks"}), flush=True)
            kept = model if whitening and damp == damp_list[0] else kept
            del model
    base = rows[0]
    for r in rows[1:]:
        r["perplexity_x"] = {d: round(p / base["perplexity"][d], 3) for d, p in r["perplexity"].items()}
        r["decode_x"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
    verdict = {}
    for target in {r["target"] for r in rows[1:]}:
        w, p = (next(r for r in rows[1:] if r["target"] == target and r["whitening"] is wh) for wh in (True, False))
        # the first whitened row of a target is the default damping
        assert w["params"] == p["params"]
        verdict[f"{target:.0%}"] = {d: w["perplexity"][d] < p["perplexity"][d] for d in w["perplexity"]}
    result = {
        "model": "smollm2-135m", "threads": 1, "dtype": "float32 (weights rounded to bfloat16, as stored)",
        "eval": {"tokens_per_domain": eval_tokens, "ctx_len": 512, "stride": 512,
                 "domains": {"pydoc": "first tokens of builtin:pydoc", "shakespeare": "tinyshakespeare"}},
        "calibration": {**CALIBRATION, "note": "whitening only; past the evaluated tokens; Shakespeare never seen"},
        "decode": {"batch": 1, "prompt_tokens": PROMPT, "new_tokens": NEW, "greedy": True, "best_of": 2},
        "rows": rows, "whitening_beats_plain_svd": verdict,
    }
    if check:
        result["folder_check"] = check_folder(max(r["target"] for r in rows[1:]), kept, tok, work)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"whitening_beats_plain_svd": verdict, "folder_check": result.get("folder_check")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
