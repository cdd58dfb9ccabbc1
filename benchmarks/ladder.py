"""The 4-bit quality ladder (issue 15): every 4-bit method and combination on the default model, measured the same
way in one run, and the llama.cpp k-quants beside them; writes benchmarks/results/ladder.json and the generated section
of docs/methods.md (between the `ladder` markers).

Each entry is the compression stages of a recipe (its quantize, prune and lora stages; recipes/ or inline) followed
by the same evaluate stages: perplexity, KL and top-1 agreement against the original on held-out Python docs (the
first `--eval-tokens` tokens; every calibration here skips past them) and on a second domain (tinyshakespeare,
beside the checkout), and the default chat prompt set (answers kept, flips) for the entries marked `chat`.
Bits per weight = the model's weight files x 8 / the model's parameters (embedding included, nothing left out).
Runs are kept under benchmarks/runs/ladder/<entry> and resumed: a second call measures only what changed.

    python benchmarks/ladder.py [--eval-tokens 8192] [--only gptq4,best] [--chat-limit 0]

`--model PATH` runs the same entries on another model folder (a generalisation check: e.g. the default model with
its Q4_1 grid dithered away); its runs go under benchmarks/runs/ladder/<folder name>/, its figures into
benchmarks/results/ladder-<folder name>.json, and docs/methods.md is left alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import typer
import yaml
from texts import eval_texts  # benchmarks/texts.py (this folder is on sys.path when run as a script)

app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs" / "ladder"
RESULT = ROOT / "benchmarks" / "results" / "ladder.json"
DOC = ROOT / "docs" / "methods.md"
BEGIN, END = "<!-- ladder:begin -->", "<!-- ladder:end -->"
HELD_OUT = 20000  # calibration skips the first 20,000 tokens of Python's docs: the evaluation reads the first 8-15k
PYDOC = {"source": "builtin:pydoc", "samples": 64, "seq_len": 512, "skip_tokens": HELD_OUT}
MIXED = {**PYDOC, "source": "builtin:mixed"}
PYSOURCE = {"source": "builtin:pysource", "samples": 32, "seq_len": 256, "skip_tokens": 0}
SELFGEN = {"source": "builtin:selfgen", "samples": 32, "seq_len": 256}
RECIPE_TOKENS = 495_616  # recipes/smollm2-prune-distill.yaml's 20 minutes of healing on 2 cores (AMX Xeon, 2026-12-05)


def gguf(gguf_type: str, calibration: dict | None = PYDOC, **kw) -> dict:
    return {"type": "quantize", "method": "gguf", "gguf_type": gguf_type, "imatrix": calibration is not None,
            **({"calibration": calibration} if calibration else {}), **kw}


#: name -> (stages or a recipe path, chat answers measured, note)
ENTRIES: dict[str, tuple[list[dict] | str | Callable[[], list[dict]], bool, str]] = {
    "rtn-g64": ("recipes/smollm2-rtn4.yaml", False, "round to nearest, the floor"),
    "bnb-nf4": ("recipes/smollm2-bnb-nf4.yaml", True, ""),
    "bnb-fp4": ("recipes/smollm2-bnb-fp4.yaml", False, ""),
    "hqq-g64": ("recipes/smollm2-hqq4.yaml", False, ""),
    "torchao-int4wo": ("recipes/smollm2-torchao-int4wo.yaml", False, ""),
    "gptq-g64-pydoc": ([{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                         "calibration": {**PYDOC, "samples": 16, "seq_len": 256}}], True,
                       "calibrated on Python's docs only (the old default)"),
    "gptq-g64-mixed": ([{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                         "calibration": {**MIXED, "samples": 16, "seq_len": 256}}], False,
                       "mixed-domain calibration (the default now)"),
    "gptq-g32-mixed": ([{"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32,
                         "calibration": {**MIXED, "samples": 16, "seq_len": 256}}], False, ""),
    "llmc-gptq-g64": ([{"type": "quantize", "method": "llmc-gptq-w4a16", "bits": 4, "group_size": 64,
                        "calibration": MIXED}], False, "llmcompressor's GPTQ, compressed-tensors (vLLM's format)"),
    "llmc-awq-g64": ([{"type": "quantize", "method": "llmc-awq-w4a16", "bits": 4, "group_size": 64,
                       "calibration": {**MIXED, "samples": 16}}], False,  # its grid search: > 20 min at 64 here
                     "llmcompressor's AWQ, compressed-tensors (vLLM's format); 16 x 512 calibration"),
    "nf4+lora-recover": ("recipes/smollm2-nf4-recover.yaml", False, "NF4 re-fitted by GPTQ into its grid, then a "
                         "quantization-aware LoRA distilled on Python's docs, merged into NF4"),
    "gguf-q4_0": ([gguf("Q4_0")], False, "llama.cpp, imatrix on Python's docs"),
    "gguf-iq4_nl": ([gguf("IQ4_NL")], False, "llama.cpp, imatrix on Python's docs"),
    "gguf-q4_k_m": ([gguf("Q4_K_M")], True, "llama.cpp's Q4_K_M + imatrix (Python's docs): the bar"),
    "gguf-q3_k_m": ([gguf("Q3_K_M")], True, "llama.cpp's Q3_K_M + imatrix (Python's docs): the k-quant nearest "
                    "prune-distill+best's size"),
    "gguf-q3_k_s": ([gguf("Q3_K_S")], True, "llama.cpp's Q3_K_S + imatrix (Python's docs): the smallest 3-bit "
                    "k-quant, beside prune-distill+best"),
    "gguf-q4_k_m-mixed": ([gguf("Q4_K_M", MIXED)], False, "the same, imatrix on mixed-domain text"),
    "gguf-q4_1": ([gguf("Q4_1")], False, "the source grid: the default model IS a dequantized Q4_1, so this "
                  "finds its weights again; not evidence about other models"),
    "best+grid": ([gguf("Q5_0", MIXED, target_bits=6.15)], False, "the same plan with every candidate, q4_1/q5_1 "
                  "included: it re-finds the source grid"),
    "gguf-q5_1": ([gguf("Q5_1")], False, "the source grid again: q5_1's half step holds q4_1's exactly"),
    "best": ("recipes/smollm2-best-4bit.yaml", True, "recipes/smollm2-best-4bit.yaml: types planned by measured "
             "sensitivity at Q4_K_M's size, q4_1/q5_1 left out"),
    # methods that shrink the model (issue 20): fewer parameters, measured with decode speed (a benchmark stage)
    "width-20": ([{"type": "prune", "method": "width", "target": 0.2, "calibration": PYSOURCE}], True,
                 "MLP channels removed (21% of the parameters), no healing"),
    "depth-20": ([{"type": "prune", "method": "depth", "target": 0.2, "calibration": PYSOURCE}], True,
                 "7 of 30 decoder layers removed (ShortGPT block influence), no healing"),
    "lowrank-20": ([{"type": "prune", "method": "lowrank", "target": 0.2, "allocation": "params",
                     "calibration": {**PYDOC, "samples": 16, "seq_len": 256}}], True,
                   "SVD-LLM (whitened SVD, one parameter ratio per layer), 20% of the parameters, no healing: against "
                   "width-20 at the same parameter count"),
    "codebook-4": ([{"type": "quantize", "method": "codebook", "bits": 4, "weighting": "fisher",
                     "calibration": {**MIXED, "samples": 16, "seq_len": 256}}], False,
                   "weight sharing: a learned 16-entry codebook per row, Fisher-weighted k-means (SqueezeLLM); our "
                   "loader dequantizes (no runtime runs it natively)"),
    "codebook-3": ([{"type": "quantize", "method": "codebook", "bits": 3, "weighting": "activation",
                     "calibration": {**MIXED, "samples": 16, "seq_len": 256}}], False,
                   "the same at 3 bits, activation-weighted"),
    "prune-distill": ("recipes/smollm2-prune-distill.yaml", True,
                      "the recipe: 3 layers chosen by removal loss + MLP width ranked on a quarter code, three "
                      "quarters the original's own text (20% of the parameters) + 20 min of distillation from the "
                      "original, embeddings frozen, on the standard library's source and the original's own chats "
                      "and prose (neither evaluated domain)"),
    # run to run: the same stages, the healing windows in another order (the only randomness of `train: all`)
    "prune-distill-seed1": (lambda: with_distill("recipes/smollm2-prune-distill.yaml", seed=1), True,
                            "prune-distill with the healing data in another order (distill seed 1)"),
    "prune-distill-second": (lambda: second_prune_distill(), True,
                             "the second recipe: 3 layers by removal loss + MLP width ranked on code and the "
                             "original's own text half and half, embeddings trained, the same healing"),
    "prune-distill-first": (lambda: first_prune_distill(), True,
                            "the first recipe: 3 layers by block influence + MLP width ranked on code, the same "
                            "healing"),
    # the healing budget's effect (issue 20: "2x and 4x the budget"): a 20-minute run's tokens doubled and
    # quadrupled, as token budgets so the figure does not depend on the machine's speed or load. The recipe's run
    # trained 495,616 tokens (242 steps of 8 x 256 at 412 tokens/s on an AMX Xeon), the first recipe's 380,928.
    "prune-distill-2x": (lambda: with_distill("recipes/smollm2-prune-distill.yaml",
                                              budget={"tokens": 2 * RECIPE_TOKENS}), False,
                         "prune-distill with twice the healing tokens"),
    "prune-distill-4x": (lambda: with_distill("recipes/smollm2-prune-distill.yaml",
                                              budget={"tokens": 4 * RECIPE_TOKENS}), False,
                         "prune-distill with four times the healing tokens"),
    "prune-distill-first-2x": (lambda: with_distill(first_prune_distill(), budget={"tokens": 2 * 380_928}), True,
                               "prune-distill-first with twice the healing tokens"),
    "prune-distill-first-4x": (lambda: with_distill(first_prune_distill(), budget={"tokens": 4 * 380_928}), True,
                               "prune-distill-first with four times the healing tokens"),
    # the learning rate: the held-out curve of the 1e-4 run is flat after ~100 steps (and 2x the tokens bought
    # 0.03x): does a larger step reach a lower plateau in the same 20 minutes?
    "prune-distill-lr3e-4": (lambda: with_distill(first_prune_distill(), lr=3e-4), True,
                             "prune-distill-first with a learning rate of 3e-4 (the recipe: 1e-4)"),
    "prune-distill-prose": (lambda: with_distill(first_prune_distill(), data=[
        {"source": "builtin:pysource", "samples": 256, "seq_len": 256, "skip_tokens": 0},
        {"source": "builtin:selfgen", "samples": 768, "seq_len": 256}]), True,
        "prune-distill-first with three quarters of the healing windows the original's own text (the recipe: 3/8)"),
    "prune-distill-depth2": (lambda: [{**s, "layers": 2} if s.get("method") == "depth" else
                                      {**s, "target": 0.157} if s.get("method") == "width" else s
                                      for s in first_prune_distill()], True,
                             "prune-distill-first with 2 whole layers cut instead of 3 and more MLP channels (the "
                             "same parameter count)"),
    # the tied embedding is also the output layer: trained on code and chat only, it may push down tokens those never
    # use (the other domain's words); frozen, 28.3M fewer weights train and the output layer stays the original's
    "prune-distill-frozen-emb": (lambda: with_distill(second_prune_distill(), train_embeddings=False),
                                 True, "prune-distill-second with the (tied) embeddings frozen during healing"),
    "prune-distill-first+best": (lambda: [*first_prune_distill(), *compress_stages("recipes/smollm2-best-4bit.yaml")],
                                 True, "prune-distill-first, then the best 4-bit recipe's GGUF plan on the pruned "
                                 "model"),
    "prune-distill-second+best": (lambda: [*second_prune_distill(),
                                           *compress_stages("recipes/smollm2-best-4bit.yaml")], True,
                                  "prune-distill-second, then the best 4-bit recipe's GGUF plan on the pruned model"),
    "prune-distill+best": (["recipes/smollm2-prune-distill.yaml", "recipes/smollm2-best-4bit.yaml"], True,
                           "prune-distill, then the best 4-bit recipe's GGUF plan on the pruned model"),
}
#: Entries that shrink the model: a benchmark stage times their decode against the original's. They run on 2 torch
#: threads (the distill budget is "20 minutes on 2 cores"), the other entries on --threads.
SHRINK = ("width-20", "depth-20", "lowrank-20", "prune-distill", "prune-distill-seed1", "prune-distill-2x",
          "prune-distill-4x", "prune-distill-first", "prune-distill-first-2x", "prune-distill-first-4x",
          "prune-distill-lr3e-4", "prune-distill-prose", "prune-distill-depth2", "prune-distill-second",
          "prune-distill-frozen-emb", "prune-distill-first+best", "prune-distill-second+best", "prune-distill+best")
SHRINK_THREADS = 2


def with_distill(spec, **settings) -> list[dict]:
    """An entry's compressing stages (a recipe path or stages) with these settings of its distill stage replaced."""
    return [{**s, **settings} if s["type"] == "distill" else s for s in compress_stages(spec)]


def first_prune_distill() -> list[dict]:
    """recipes/smollm2-prune-distill.yaml as first written (until 2026-12-05): layers by block influence, MLP channels
    ranked on code only. The recipe now ranks both differently; the healing runs that measured tokens, data and
    learning rate started from this one."""
    return [{"type": "prune", "method": "depth", "layers": 3, "calibration": PYSOURCE},
            {"type": "prune", "method": "width", "target": 0.13, "calibration": PYSOURCE},
            {"type": "distill", "teacher": "original",
             "data": [{**PYSOURCE, "samples": 640}, {**SELFGEN, "samples": 384}],
             "top_k": 64, "budget": {"minutes": 20}, "lr": 0.0001, "batch_size": 8,
             "held_out": {"source": "builtin:pydoc", "tokens": 2048, "every": 100}}]


def second_prune_distill() -> list[dict]:
    """recipes/smollm2-prune-distill.yaml as it was on 2026-12-05 evening: layers by removal loss, MLP channels ranked
    on code and the original's own text half and half, the embeddings trained. The recipe now ranks on a quarter code
    and freezes the embeddings."""
    first = first_prune_distill()
    return [{**first[0], "importance": "perplexity"}, {**first[1], "calibration": [PYSOURCE, SELFGEN]}, first[2]]


def compress_stages(spec: list | str | Callable[[], list[dict]]) -> list[dict]:
    """The compressing stages of an entry: inline stages, a recipe's, several recipes' one after another, or a
    function that builds them."""
    if callable(spec):
        return spec()
    if isinstance(spec, list):
        return [s for part in spec for s in ([part] if isinstance(part, dict) else compress_stages(part))]
    stages = yaml.safe_load((ROOT / spec).read_text())["stages"]
    return [s for s in stages if s["type"] in ("quantize", "prune", "lora", "distill")]


def recipe(name: str, spec, chat: bool, texts: dict[str, Path], threads: int, chat_limit: int | None,
           model: str = "smollm2-135m") -> dict:
    evals = [{"type": "evaluate", "name": domain, "tasks": [], "kl": True,
              "perplexity": {"corpus": str(path), "ctx_len": 512, "stride": 256, "max_tokens": 100_000}}
             for domain, path in texts.items()]
    if chat:
        evals.append({"type": "evaluate", "name": "chat", "tasks": [], "perplexity": None, "kl": False,
                      "chat": {"limit": chat_limit} if chat_limit else {}})
    stages = compress_stages(spec)
    if name in SHRINK:  # decode at batch 1 against the original, in the same process (paired rounds)
        gguf_file = any(s["type"] == "quantize" and s.get("method") == "gguf" for s in stages)
        # transformers cannot run a GGUF file: llama.cpp runs it, and the original as its F16 GGUF
        evals.append({"type": "benchmark", "batch_sizes": [1], **({"backends": ["llamacpp"]} if gguf_file else {})})
    return {"name": recipe_name(name), "model": model, "threads": threads,
            "stages": [*stages, *evals]}


def reuse_prefix(name: str, runs: Path) -> str | None:
    """Seed entry ``name``'s run folder with the finished stage folders it shares with another entry's run: the
    longest run of leading compressing stages that are the same (prune-distill+best starts with prune-distill's 20
    minutes of healing; prune-distill-first-2x with its two prune stages). Hard links, so the run resumes after them (a
    stage's fingerprint is the model and the stages up to it, not the recipe's name). Returns the entry reused."""
    mine = compress_stages(ENTRIES[name][0])

    def shared(other: str) -> int:
        theirs, n = compress_stages(ENTRIES[other][0]), 0
        while n < min(len(mine), len(theirs)) and mine[n] == theirs[n]:
            n += 1
        return n

    candidates = [o for o in ENTRIES if o != name and (o in SHRINK) == (name in SHRINK)]  # same torch threads
    best = max(candidates, key=shared, default=None)
    n = shared(best) if best else 0
    folders = sorted((runs / best).glob("[0-9][0-9]-*"))[:n] if n else []
    if not n or len(folders) < n or not all((f / "result.json").is_file() for f in folders):
        return None
    seed_run(runs / name, recipe_name(name), folders)
    return best


def seed_run(run: Path, name: str, folders: list[Path]) -> None:
    """Make ``run`` a run folder (an existing manifest is kept) holding hard links of these finished stage folders,
    so a run of the same stages resumes after them."""
    import shutil

    from llmcompress import rundir

    run.mkdir(parents=True, exist_ok=True)
    rundir.start_manifest(run, name)
    for f in folders:
        if not (run / f.name).exists():
            shutil.copytree(f, run / f.name, copy_function=os.link)


def recipe_name(entry: str) -> str:
    return "ladder-" + entry.replace("+", "-")  # no "+" in a recipe name


def collect(run: Path, texts: dict[str, Path]) -> dict:
    """The entry's figures from its stage results."""
    out: dict = {}
    evaluated = {}
    for d in sorted(run.glob("*-evaluate*")):
        data = json.loads((d / "result.json").read_text())["result"]
        evaluated[data["label"]] = data["data"]
    report = json.loads((run / "report.json").read_text())
    out["size_bytes"] = report["comparison"]["size"]["compressed_bytes"]
    out["original_bytes"] = report["comparison"]["size"]["original_bytes"]
    for domain in texts:
        e = evaluated.get(domain)
        if e is None:
            continue
        o, c = e["original"]["perplexity"]["perplexity"], e["compressed"]["perplexity"]["perplexity"]
        out[domain] = {"original": o, "compressed": c, "change_pct": 100 * (c / o - 1),
                       "kl": e["compressed"]["kl"]["kl_mean"], "top1": e["compressed"]["kl"]["top1_agreement"],
                       "tokens": e["compressed"]["perplexity"]["tokens"]}
    for d in sorted(run.glob("*-prune*")):  # a structural prune stage says how many parameters are left
        data = json.loads((d / "result.json").read_text())["result"]["data"]
        if "params_after" in data:
            out["params"] = data["params_after"]
    for d in sorted(run.glob("*-distill*")):
        data = json.loads((d / "result.json").read_text())["result"]["data"]
        out["healing"] = {k: data.get(k) for k in ("tokens_trained", "minutes", "tokens_per_second", "steps",
                                                   "teacher_cache_seconds", "held_out_curve")}
    from llmcompress.report.leaderboard import run_row

    row = run_row(report)
    if row.get("speedup") is not None:  # the benchmark stage: decode at batch 1, paired with the original
        bench = next(iter(sorted(run.glob("*-benchmark*"))), None)
        backend = (json.loads((bench / "result.json").read_text())["result"]["data"]["settings"]["table_backend"]
                   if bench else "hf")
        out["decode"] = {"figure": row["speed_figure"], "original": row["speed_original"],
                         "compressed": row["speed"], "speedup": row["speedup"], "backend": backend}
    if "chat" in evaluated:
        o, c = evaluated["chat"]["original"]["chat"], evaluated["chat"]["compressed"]["chat"]
        out["chat"] = {k: c.get(k) for k in ("correct", "n", "accuracy", "flips", "gains", "exact_agreement")}
        out["chat"]["original_correct"] = o.get("correct")
    return out


def n_params(folder: Path | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcompress.models.builtin import smollm2_135m

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder or smollm2_135m())))
    return sum(p.numel() for p in model.parameters())  # tied embedding counted once, as it is stored


def markdown(result: dict) -> str:
    rows = sorted(result["entries"].items(), key=lambda kv: kv[1].get("pydoc", {}).get("change_pct", 1e9))
    domains = result["domains"]
    head = ["entry", "parameters", "bits / weight", "size"] + [f"{d} ppl (vs original)" for d in domains] + \
        [f"{d} KL / top-1" for d in domains] + ["chat answers kept (flips)", "decode, batch 1 (vs original)",
                                                 "healing", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in rows:
        if "error" in e:
            lines.append(f"| {name} | not run: {e['error']} |" + " |" * (len(head) - 2))
            continue
        params = e.get("params", result["params"])
        cells = [f"**{name}**" if name == "best" else name,
                 f"{params / 1e6:.1f}M" + (f" ({1 - params / result['params']:.0%} fewer)" if params < result["params"]
                                           else ""),
                 f"{e['bits_per_weight']:.2f}", f"{e['size_bytes'] / 2**20:.1f} MiB"]
        cells += [f"{e[d]['compressed']:.3f} ({e[d]['change_pct']:+.2f}%)" if d in e else "—" for d in domains]
        cells += [f"{e[d]['kl']:.4f} / {e[d]['top1']:.1%}" if d in e else "—" for d in domains]
        ch = e.get("chat")
        cells.append(f"{ch['correct']} of {ch['n']} ({ch['flips']} flips; original {ch['original_correct']})"
                     if ch else "—")
        dec = e.get("decode")
        engine = " under llama.cpp, original as F16 GGUF" if dec and dec.get("backend") == "llamacpp" else ""
        cells.append(f"{dec['compressed']:.1f} tok/s ({dec['speedup']:.2f}x{engine})" if dec else "—")
        heal = e.get("healing")
        cells.append(f"{heal['tokens_trained']:,} tokens, {heal['minutes']:.1f} min" if heal else "—")
        here = e.get("cpu_flags")
        other = "" if here == result["machine"]["cpu_flags"] else (
            f" [measured on another CPU: {', '.join(here)}]" if here else " [measured in an earlier run; its CPU "
            "was not recorded]")
        cells.append(e.get("note", "") + other)
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    orig = {d: next(e[d]["original"] for e in result["entries"].values() if d in e) for d in domains}
    intro = [
        "## Quality ladder: 4-bit methods, and methods that shrink the model",
        "",
        f"Generated by `python benchmarks/ladder.py` on {result['date']} ({result['wall_s'] / 60:.0f} min; "
        f"CPU flags: {', '.join(m['cpu_flags'])}; torch and llama.cpp threads {m['threads']}). Do not edit by hand.",
        f"Perplexity on the first {result['eval_tokens']:,} tokens of each text (windows of 512, stride 256): "
        + ", ".join(f"{d} original {orig[d]:.3f}" for d in domains) + ". KL(original ‖ model) and top-1 "
        "agreement on the same positions. Calibration never reads the evaluated text (Python's docs: it starts "
        f"after token {HELD_OUT:,}; Shakespeare is never calibrated on). GGUF models are scored on llama.cpp's "
        "logits, the others under transformers, against the same original. Sorted by the Python-docs change.",
        "Bits per weight: the weight files x 8 / the original's parameters (embedding included; a pruned model "
        "reads as fewer bits per original weight). Chat: the default prompt set "
        "(llmcompress/evals/chat), greedy, 24 new tokens; flips = right before, wrong after. Decode: tokens/s at "
        f"batch 1 under transformers, {SHRINK_THREADS} torch threads, paired with the original in "
        "the same run (entries that shrink the model). Healing: the distill stage's training tokens and minutes "
        "(teacher logits cached before it, not counted).",
        "",
    ]
    missing = [n for n in ENTRIES if n not in result["entries"]]
    tail = ["", f"Not measured in this run: {', '.join(missing)}."] if missing else []
    return "\n".join(intro + lines + tail) + "\n"


def cpu_flags() -> list[str]:
    from llmcompress.llamacpp import runtime

    return runtime.isa_flags()


def save(entries: dict, result_file: Path, write_doc: bool, model: Path | None, eval_tokens: int,
         texts: dict[str, Path], params: int, threads: int, t0: float) -> dict:
    """Write the results (and the doc's section) as they stand: an entry measured is never lost to a later one."""
    result = {"date": time.strftime("%Y-%m-%d"), "model": str(model) if model else "smollm2-135m",
              "eval_tokens": eval_tokens, "domains": list(texts),
              "params": params, "wall_s": round(time.perf_counter() - t0),
              "machine": {"cpu_flags": cpu_flags(), "threads": threads,
                          "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2)},
              "entries": {n: entries[n] for n in ENTRIES if n in entries}}
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    if write_doc:
        text = DOC.read_text()
        section = f"{BEGIN}\n{markdown(result)}{END}"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        DOC.write_text(text)
    return result


@app.command()
def main(eval_tokens: int = 8192, threads: int = 1, only: str = "", chat_limit: int = 0,
         write_doc: bool = True, model: Path | None = None) -> None:
    from llmcompress import load_recipe, run_recipe
    from llmcompress.errors import LLMCompressError

    t0 = time.perf_counter()
    runs, result_file = RUNS, RESULT
    if model is not None:  # another model: its own runs and results, the doc untouched
        model = model.resolve()
        runs, result_file, write_doc = RUNS / model.name, RESULT.with_name(f"ladder-{model.name}.json"), False
    runs.mkdir(parents=True, exist_ok=True)
    texts = eval_texts(RUNS, eval_tokens)
    params = n_params(model)
    previous = json.loads(result_file.read_text()).get("entries", {}) if result_file.is_file() else {}
    names = [n for n in ENTRIES if not only or n in only.split(",")]
    entries = {n: previous[n] for n in previous if n in ENTRIES}
    for name in names:
        spec, chat, note = ENTRIES[name]
        run = runs / name
        print(f"== {name}", flush=True)
        try:
            entry_threads = SHRINK_THREADS if name in SHRINK else threads
            reused = reuse_prefix(name, runs)
            if reused:
                print(f"   (its first stages are {reused}'s: reused from {runs / reused})", flush=True)
            run_recipe(load_recipe(recipe(name, spec, chat, texts, entry_threads, chat_limit or None,
                                          str(model) if model else "smollm2-135m")), run,
                       show_progress=False)
            e = collect(run, texts)
            e["bits_per_weight"] = e["size_bytes"] * 8 / params
            e["threads"] = entry_threads
            e["load_average"] = round(os.getloadavg()[0], 2)
            e["cpu_flags"] = cpu_flags()
        except LLMCompressError as err:
            e = {"error": str(err).splitlines()[0]}
        entries[name] = {**e, "note": note}
        print(json.dumps(entries[name]), flush=True)
        save(entries, result_file, write_doc, model, eval_tokens, texts, params, threads, t0)  # after each entry
    print(markdown(save(entries, result_file, write_doc, model, eval_tokens, texts, params, threads, t0)))


if __name__ == "__main__":
    app()
