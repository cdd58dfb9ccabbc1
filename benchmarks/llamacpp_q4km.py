"""GGUF targets (issue 14): our Q4_K_M + imatrix against llama.cpp's own tools run by hand, and its speed against our
best transformers path, in one run on this machine.

1. The pipeline: `method: gguf` Q4_K_M with an importance matrix from Python's docs (calibration windows drawn after
   the first 20,000 tokens), evaluated on the first `--eval-tokens` tokens of Python's docs (disjoint) and on
   tinyshakespeare when it is beside the checkout (a second domain); benchmark at batch 1 with backends hf and
   llamacpp, plus GPTQ 4-bit g64 (our best transformers path) as a `compare` entry, interleaved call by call.
2. By hand, as a llama.cpp user would: convert_hf_to_gguf.py (F16), llama-imatrix on the calibration text the stage
   wrote (-c 512, one chunk per window), llama-quantize --imatrix -> Q4_K_M.
3. llama-perplexity (-c 512) on each text for F16, ours and the hand-made file.

Targets: ours within 0.5% of the hand-made file's perplexity; llama.cpp Q4_K_M decode at batch 1 >= 1.6x GPTQ under
transformers (median of per-round ratios). Writes benchmarks/results/gguf.json and prints a Markdown table.

    python benchmarks/llamacpp_q4km.py [--threads 1] [--eval-tokens 14500] [--repeats 5]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import typer
from texts import eval_texts  # benchmarks/texts.py (this folder is on sys.path when run as a script)

app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def recipe(folder: Path, texts: dict[str, Path], threads: int, repeats: int) -> dict:
    gptq = folder / "gptq4.yaml"  # our best transformers path, quantize only
    gptq.write_text(json.dumps({"name": "gptq4", "model": "smollm2-135m", "threads": threads, "stages": [
        {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
         "calibration": {"source": "builtin:pydoc", "samples": 16, "seq_len": 256, "skip_tokens": 20000}}]}))
    evals = [{"type": "evaluate", "name": name, "tasks": [], "kl": True,
              "perplexity": {"corpus": str(path), "ctx_len": 512, "stride": 256, "max_tokens": 100_000}}
             for name, path in texts.items()]
    return {"name": "gguf-bench", "model": "smollm2-135m", "threads": threads, "stages": [
        {"type": "quantize", "method": "gguf", "gguf_type": "Q4_K_M",
         "calibration": {"source": "builtin:pydoc", "samples": 64, "seq_len": 512, "skip_tokens": 20000}},
        *evals,
        {"type": "benchmark", "backends": ["hf", "llamacpp"], "batch_sizes": [1], "prompt_tokens": 16,
         "new_tokens": 64, "repeats": repeats, "warmup": 1, "memory": False, "compare": [str(gptq)]},
    ]}


def tool(name: str) -> str:
    from llmcompress.llamacpp import runtime

    return str(runtime.tool(name, "benchmarks/llamacpp_q4km.py"))


def call(cmd: list[str], log: Path) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed; see {log}")
    return proc.stdout + proc.stderr


def by_hand(folder: Path, source: Path, calibration: Path, threads: int) -> dict[str, Path]:
    """F16 and Q4_K_M + imatrix made with llama.cpp's tools directly, as its README shows."""
    from llmcompress.llamacpp.convert import to_gguf

    f16 = to_gguf(source, folder / "hand-f16.gguf", "f16", log_path=folder / "hand-convert.log")
    imatrix = folder / "hand-imatrix.gguf"
    call([tool("llama-imatrix"), "-m", str(f16), "-f", str(calibration), "-o", str(imatrix), "-c", "512",
          "--chunks", "64", "-b", "512", "-t", str(threads)], folder / "hand-imatrix.log")
    q4 = folder / "hand-q4_k_m.gguf"
    call([tool("llama-quantize"), "--imatrix", str(imatrix), str(f16), str(q4), "Q4_K_M", str(threads)],
         folder / "hand-quantize.log")
    return {"f16": f16, "q4_k_m_hand": q4}


def llama_perplexity(gguf: Path, text: Path, threads: int, log: Path) -> float:
    out = call([tool("llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "512", "-b", "512", "-t",
                str(threads)], log)
    found = re.findall(r"Final estimate: PPL = ([0-9.]+)", out)
    if not found:
        raise SystemExit(f"no perplexity in {log}")
    return float(found[-1])


def paired(per_repeat: dict, new: str, old: str, figure: str) -> float | None:
    a, b = per_repeat.get(old, {}).get(figure), per_repeat.get(new, {}).get(figure)
    if not a or not b:
        return None
    return round(statistics.median(y / x for x, y in zip(a, b)), 3)


@app.command()
def main(threads: int = 1, eval_tokens: int = 14500, repeats: int = 5,
         out: Path = typer.Option(ROOT / "benchmarks" / "runs" / "gguf", help="Work folder (run folder inside)."),
         ) -> None:
    from llmcompress import load_recipe, run_recipe
    from llmcompress.llamacpp import runtime

    runtime.require("benchmarks/llamacpp_q4km.py")
    out.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    texts = eval_texts(out, eval_tokens)
    run_dir = out / "run"
    run_recipe(load_recipe(recipe(out, texts, threads, repeats)), run_dir, fresh=True, show_progress=False)
    stage = run_dir / "01-quantize"
    ours = stage / "model" / "model.gguf"
    from llmcompress.models.builtin import smollm2_135m

    source = smollm2_135m()  # the dense folder the pipeline started from (cached)
    files = {**by_hand(out, source, stage / "calibration.txt", threads), "q4_k_m_ours": ours}
    ppl = {name: {k: llama_perplexity(f, text, threads, out / f"ppl-{k}-{name}.log") for k, f in files.items()}
           for name, text in texts.items()}
    evaluate = {name: json.loads((d / "result.json").read_text())["result"]["data"]
                for name, d in zip(texts, sorted(run_dir.glob("*-evaluate")))}
    bench = json.loads(next(run_dir.glob("*-benchmark")).joinpath("result.json").read_text())["result"]["data"]
    per = bench["raw"]["per_repeat"]
    gptq_key = next(k for k in per if k.startswith("hf/") and k not in ("hf/original", "hf/compressed"))
    fig = "decode_tok_s_bs1"
    result = {
        "machine": {"cpu_flags": runtime.isa_flags(), "threads": threads,
                    "cores": os.cpu_count(), "load_average_before": round(load0, 2),
                    "load_average_after": round(os.getloadavg()[0], 2), "llama_cpp": runtime.LLAMA_CPP_COMMIT},
        "eval_tokens": eval_tokens,
        "sizes_mib": {k: round(f.stat().st_size / 2**20, 2) for k, f in files.items()},
        "llama_perplexity": ppl,
        "ours_vs_hand_pct": {n: round(100 * (p["q4_k_m_ours"] / p["q4_k_m_hand"] - 1), 3) for n, p in ppl.items()},
        "q4_k_m_vs_f16_pct": {n: round(100 * (p["q4_k_m_ours"] / p["f16"] - 1), 2) for n, p in ppl.items()},
        "our_evaluator": {n: {"original": e["original"]["perplexity"]["perplexity"],
                              "q4_k_m": e["compressed"]["perplexity"]["perplexity"],
                              "kl_mean": e["compressed"]["kl"]["kl_mean"],
                              "top1_agreement": e["compressed"]["kl"]["top1_agreement"],
                              "tokens": e["compressed"]["perplexity"]["tokens"]} for n, e in evaluate.items()},
        "decode_tok_s_bs1": {k: round(statistics.median(v[fig]), 2) for k, v in per.items() if fig in v},
        "decode_ratio_q4_k_m_llamacpp_vs_gptq_hf": paired(per, "llamacpp/compressed", gptq_key, fig),
        "decode_ratio_q4_k_m_llamacpp_vs_original_hf": paired(per, "llamacpp/compressed", "hf/original", fig),
        "decode_ratio_q4_k_m_vs_f16_llamacpp": paired(per, "llamacpp/compressed", "llamacpp/original", fig),
        "unsupported": {b: r["unsupported"] for b, r in bench["backends"].items() if r["unsupported"]},
        "wall_s": round(time.perf_counter() - t0),
    }
    result["targets"] = {
        "ppl_within_0.5pct_of_hand": all(abs(v) <= 0.5 for v in result["ours_vs_hand_pct"].values()),
        "decode_at_least_1.6x_gptq_hf": (result["decode_ratio_q4_k_m_llamacpp_vs_gptq_hf"] or 0) >= 1.6,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
