"""Two questions benchmarks/lowrank.py raised, on the same model, texts and calibration (writes
benchmarks/results/lowrank-explore.json; the original's figures are re-measured here):

- damping: does a larger `damp` (X^T X + damp * mean diag * I) keep the whitened factorization from over-fitting the
  calibration domain (Python's docs), i.e. help on Shakespeare?
- allocation: the stage keeps one *rank fraction* for every layer, so square layers (q_proj, o_proj), whose pair pays
  only below half their rank, stay dense while the MLP loses half its rank. SVD-LLM instead keeps one *parameter
  ratio* per layer (rank = (1 - ratio) m n / (m + n)); the same parameter count, spread over every layer.

    python benchmarks/lowrank_explore.py [--targets 0.1,0.2]   (written after every variant)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import typer
from lowrank import CALIBRATION, ROOT, decode_tok_s, perplexities, round_to_bf16_
from texts import eval_texts

app = typer.Typer(add_completion=False)
RESULT = ROOT / "benchmarks" / "results" / "lowrank-explore.json"


def by_params(shapes: dict, total: int, target: float) -> dict[str, int]:
    """Every layer keeps the same share of its parameters: the smallest share removed that meets the target."""
    from llmcompress.prune.lowrank import removed, saves

    need = math.ceil(target * total)

    def at(ratio: float) -> dict[str, int]:
        ranks = {n: max(1, math.floor((1 - ratio) * s[0] * s[1] / (s[0] + s[1]))) for n, s in shapes.items()}
        return {n: r for n, r in ranks.items() if saves(r, shapes[n])}

    lo, hi = 0.0, 1.0  # removed(at(hi)) >= need
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if removed(at(mid), shapes) >= need else (mid, hi)
    return at(hi)


def variant(original, tok, texts, tokens, ids, target: float, damp: float, allocation: str) -> dict:
    import copy

    from llmcompress.prune.lowrank import LowRankConfig
    from llmcompress.prune.lowrank_layers import factorize_model_
    from llmcompress.prune.lowrank_run import count_params, rank_summary

    cfg = LowRankConfig(target=target, calibration=CALIBRATION, damp=damp)
    model = copy.deepcopy(original)
    before = count_params(model)
    shapes = cfg.targets(model)
    ranks = cfg.plan(shapes, before) if allocation == "rank" else by_params(shapes, before, target)
    t = time.perf_counter()
    factorize_model_(model, ranks, ids, damp)
    seconds = time.perf_counter() - t
    round_to_bf16_(model)
    after = count_params(model)
    return {"variant": f"svd-llm -{target:.0%} damp {damp} allocation {allocation}", "target": target, "damp": damp,
            "allocation": allocation, "params": after, "removed_share": 1 - after / before,
            "factorize_seconds": round(seconds, 1), "perplexity": perplexities(model, tok, texts, tokens),
            "decode_tok_s": decode_tok_s(model), "ranks": rank_summary(ranks, shapes)}


@app.command()
def main(targets: str = "0.1,0.2", eval_tokens: int = 3072):
    import torch

    torch.set_num_threads(1)
    from llmcompress.data import CalibrationConfig, load_calibration
    from llmcompress.models.builtin import smollm2_135m
    from llmcompress.models.loading import load_model

    t_all = time.perf_counter()
    texts = eval_texts(Path(tempfile.mkdtemp(prefix="lowrank-explore-")), eval_tokens)
    original, tok = load_model(smollm2_135m(), "cpu", "float32")
    ids = load_calibration(CalibrationConfig(**CALIBRATION), tok, None)
    base = {"variant": "original", "perplexity": perplexities(original, tok, texts, eval_tokens),
            "decode_tok_s": decode_tok_s(original)}
    rows = [base]
    print(json.dumps(base), flush=True)
    for target in [float(t) for t in targets.split(",")]:
        for damp, allocation in ((0.1, "rank"), (0.01, "params")):
            row = variant(original, tok, texts, eval_tokens, ids, target, damp, allocation)
            row["perplexity_x"] = {d: round(p / base["perplexity"][d], 3) for d, p in row["perplexity"].items()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
            RESULT.write_text(json.dumps({"model": "smollm2-135m", "threads": 1, "calibration": CALIBRATION,
                                          "eval_tokens_per_domain": eval_tokens, "rows": rows,
                                          "seconds": round(time.perf_counter() - t_all, 1)}, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()
