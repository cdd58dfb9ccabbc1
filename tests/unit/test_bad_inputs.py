"""The bad-input corpus: malformed recipes, sweeps and command lines of every kind a hostile but fair user tries.

Each case must end with exit code 2, one message that names the place (the file, the line or stage and key, the
option) and no traceback, before any weights load. Most cases run in this process through typer's CliRunner (the
real command functions; fast); ``test_the_real_entry_point_*`` runs a sample through ``python -m llmcompress.cli``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
#: What a traceback or an unhandled exception looks like in the output.
CRASH = re.compile(r"Traceback|^\w+(Error|Exception):|RecursionError|UnicodeDecodeError", re.MULTILINE)


def head(stages: str, extra: str = "") -> str:
    return f"name: r\nmodel: tiny-random-llama\nthreads: 1\n{extra}stages:\n{stages}"


def stage(text: str) -> str:
    return head(f"  - {text}\n")


@dataclass
class Case:
    """``text`` (str or bytes) is written to ``r.yaml``; ``args`` replace the default ``validate {file}``.
    ``expect``: fragments the message must hold (``{file}`` and ``{dir}`` are filled in)."""

    id: str
    text: str | bytes | None = None
    expect: tuple[str, ...] = ()
    args: tuple[str, ...] = ("validate", "{file}")
    files: dict[str, str | bytes] = field(default_factory=dict)  # more files beside the recipe
    kind: str = "recipe"
    env: dict[str, str] = field(default_factory=dict)


def C(id, text=None, *expect, args=("validate", "{file}"), files=None, kind="recipe", env=None) -> Case:
    return Case(id, text, tuple(expect), tuple(args), files or {}, kind, env or {})


BOMB = ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n")

# ---------------------------------------------------------------------------------------------------------------------
# The recipe file itself

FILE_CASES = [
    C("non-utf8", b"name: r\xe9\nmodel: tiny-random-llama\n", "{file}", "not UTF-8"),
    C("latin1-comment", "# caf\xe9\nname: r\n".encode("latin-1"), "{file}", "not UTF-8"),
    C("binary-garbage", bytes(range(256)) * 4, "{file}", "binary file"),
    C("png-header", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "{file}", "binary file"),
    C("empty-file", "", "{file}", "a recipe is a mapping"),
    C("only-comment", "# nothing here\n", "{file}", "a recipe is a mapping"),
    C("top-level-list", "- a\n- b\n", "{file}", "a recipe is a mapping"),
    C("top-level-scalar", "42\n", "{file}", "a recipe is a mapping"),
    C("top-level-string", "hello\n", "{file}", "a recipe is a mapping"),
    C("unclosed-bracket", "name: r\nstages: [\n", "{file}", "not valid YAML"),
    C("unclosed-quote", 'name: "r\nmodel: x\n', "{file}", "not valid YAML"),
    C("tab-indent", "name: r\nstages:\n\t- {type: evaluate}\n", "{file}", "line 3", "not valid YAML"),
    C("bad-indent", "name: r\n  model: x\n stages: []\n", "{file}", "not valid YAML"),
    C("two-documents", "name: r\n---\nname: s\n", "{file}", "not valid YAML"),
    C("deep-nesting-flow", "name: r\nx: " + "[" * 5000 + "]" * 5000 + "\n", "{file}", "nested more than 64"),
    C("deep-nesting-block", "name: r\nx:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)), "{file}",
      "nested more than 64"),
    C("alias-bomb-top", BOMB + "name: r\n", "{file}", "alias bomb"),
    C("alias-bomb-in-stage", head("  - {type: evaluate, tasks: *f}\n", BOMB), "{file}", "alias bomb"),
    C("recursive-alias", "name: &a [1, *a]\n", "{file}", "recursive"),
    C("undefined-alias", "name: *nothing\n", "{file}", "not valid YAML"),
    C("duplicate-top-key", "name: r\nname: s\nmodel: tiny-random-llama\nstages: [{type: evaluate}]\n", "{file}",
      "line 2", "`name` is given twice"),
    C("duplicate-stage-key", stage("{type: quantize, method: rtn, bits: 2, bits: 8}"), "{file}",
      "`bits` is given twice"),
    C("duplicate-block-key", head("  - type: quantize\n    method: rtn\n    bits: 2\n    bits: 8\n"), "{file}",
      "line 8", "lines 7 and 8"),
    C("duplicate-nested-key", stage("{type: lora, objective: sft, data: {samples: 2, samples: 3}}"), "{file}",
      "`samples` is given twice"),
    C("huge-file", "name: r\n" + "# padding\n" * 600_000, "{file}", "larger than 4 MiB"),
    C("python-tag", "name: !!python/object/apply:os.system [echo pwned]\n", "{file}", "not valid YAML"),
    C("set-tag", "name: !!set {a, b}\nmodel: x\nstages: []\n", "{file}", "name"),
    C("folder-as-recipe", None, "{dir}", "is a folder", args=("validate", "{dir}")),
    C("dev-zero", None, "/dev/zero", "not a regular file", args=("validate", "/dev/zero")),
    C("missing-file", None, "nope.yaml", "no such recipe file", args=("validate", "{dir}/nope.yaml")),
    C("run-missing-file", None, "nope.yaml", "no such recipe file", args=("run", "{dir}/nope.yaml")),
    C("null-byte-in-text", "name: r\x00\n", "{file}", "binary file"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Top-level keys

TOP_CASES = [
    C("missing-name", "model: tiny-random-llama\nstages: [{type: evaluate}]\n", "{file}", "`name` is required"),
    C("missing-model", "name: r\nstages: [{type: evaluate}]\n", "{file}", "`model` is required"),
    C("missing-stages", "name: r\nmodel: tiny-random-llama\n", "{file}", "`stages` is required"),
    C("empty-stages", "name: r\nmodel: tiny-random-llama\nstages: []\n", "{file}", "stages"),
    C("stages-mapping", "name: r\nmodel: tiny-random-llama\nstages: {type: evaluate}\n", "{file}", "stages"),
    C("stage-scalar", head("  - evaluate\n"), "{file}", "stages[0] must be a mapping"),
    C("stage-no-type", head("  - {method: rtn}\n"), "{file}", "stages[0] has no `type:`"),
    C("unknown-stage-type", stage("{type: quantise}"), "{file}", "unknown stage type `quantise`",
      "Did you mean `quantize`?"),
    C("stage-type-number", stage("{type: 3}"), "{file}", "unknown stage type `3`"),
    C("unknown-top-key", "name: r\nmodle: x\nmodel: tiny-random-llama\nstages: [{type: evaluate}]\n", "{file}",
      "unknown key `modle`", "Did you mean `model`?"),
    C("bad-name-chars", "name: ../../etc\nmodel: tiny-random-llama\nstages: [{type: evaluate}]\n", "{file}",
      "`name`"),
    C("name-number", "name: [1]\nmodel: tiny-random-llama\nstages: [{type: evaluate}]\n", "{file}", "`name`"),
    C("bad-dtype", head("  - {type: evaluate}\n", "dtype: fp8\n"), "{file}", "`dtype`"),
    C("bad-device", head("  - {type: evaluate}\n", "device: tpu\n"), "{file}", "`device`"),
    C("threads-zero", "name: r\nmodel: tiny-random-llama\nthreads: 0\nstages: [{type: evaluate}]\n", "{file}",
      "`threads`"),
    C("threads-negative", "name: r\nmodel: tiny-random-llama\nthreads: -4\nstages: [{type: evaluate}]\n", "{file}",
      "`threads`"),
    C("threads-huge", "name: r\nmodel: tiny-random-llama\nthreads: 100000000\nstages: [{type: evaluate}]\n",
      "{file}", "`threads`", "1024"),
    C("threads-string", "name: r\nmodel: tiny-random-llama\nthreads: many\nstages: [{type: evaluate}]\n", "{file}",
      "`threads`"),
    C("threads-float", "name: r\nmodel: tiny-random-llama\nthreads: 1.5\nstages: [{type: evaluate}]\n", "{file}",
      "`threads`"),
    C("seed-string", head("  - {type: evaluate}\n", "seed: abc\n"), "{file}", "`seed`"),
    C("model-number", "name: r\nmodel: 5\nstages: [{type: evaluate}]\n", "{file}", "model"),
    C("model-typo", "name: r\nmodel: tiny-random-lama\nstages: [{type: evaluate}]\n", "{file}",
      "Did you mean `tiny-random-llama`?"),
    C("model-missing-folder", "name: r\nmodel: ./no/such\nstages: [{type: evaluate}]\n", "{file}",
      "not a builtin model"),
    C("model-unknown-key", "name: r\nmodel: {source: tiny-random-llama, revison: x}\nstages: [{type: evaluate}]\n",
      "{file}", "unknown key `revison` in `model`", "Did you mean `revision`?"),
    C("model-bad-kind", "name: r\nmodel: {source: tiny-random-llama, kind: audio}\nstages: [{type: evaluate}]\n",
      "{file}", "model.kind"),
    C("model-hub-offline", "name: r\nmodel: some-org/some-model\nstages: [{type: evaluate}]\n", "{file}",
      "hub is not reachable"),
    C("gguf-missing", "name: r\nmodel: missing.gguf\nstages: [{type: evaluate}]\n", "{file}", "does not exist"),
    C("gguf-not-gguf", "name: r\nmodel: fake.gguf\nstages: [{type: evaluate}]\n", "{file}", "is not a GGUF file",
      files={"fake.gguf": "hello, I am text"}),
    C("gguf-empty", "name: r\nmodel: empty.gguf\nstages: [{type: evaluate}]\n", "{file}", "is not a GGUF file",
      files={"empty.gguf": ""}),
    C("folder-no-config", "name: r\nmodel: ./m\nstages: [{type: evaluate}]\n", "{file}", "has no config.json",
      files={"m/weights.bin": "x"}),
    C("folder-corrupt-config", "name: r\nmodel: ./m\nstages: [{type: evaluate}]\n", "{file}",
      "config.json of", "not valid JSON", files={"m/config.json": "{bad"}),
    C("folder-config-list", "name: r\nmodel: ./m\nstages: [{type: evaluate}]\n", "{file}", "config.json of",
      files={"m/config.json": "[1, 2]"}),
    C("folder-config-deep", "name: r\nmodel: ./m\nstages: [{type: evaluate}]\n", "{file}", "config.json of",
      files={"m/config.json": "[" * 100_000}),
    C("folder-garbage-weights", "name: r\nmodel: ./m\nstages: [{type: evaluate}]\n", "{file}",
      "is not a readable safetensors file", files={"m/config.json": "{\"architectures\": [\"LlamaForCausalLM\"], "
                                                   "\"model_type\": \"llama\"}",
                                                   "m/model.safetensors": b"\xff" * 64}),
    C("prune-after-quantize", head("  - {type: quantize, method: rtn}\n  - {type: prune, method: magnitude, "
                                   "sparsity: 0.5}\n"), "{file}", "pruning needs dense weights"),
    C("two-quantize", head("  - {type: quantize, method: rtn}\n  - {type: quantize, method: rtn}\n"), "{file}",
      "already quantized"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Stage settings, every stage type

STAGE_CASES = [
    # quantize
    C("quant-no-method", stage("{type: quantize}"), "{file}", "stages[0]", "no `method:` given"),
    C("quant-unknown-method", stage("{type: quantize, method: bnb-nf5}"), "{file}", "Did you mean `bnb-nf4`?"),
    C("quant-method-list", stage("{type: quantize, method: [rtn]}"), "{file}", "unknown method"),
    C("quant-unknown-key", stage("{type: quantize, method: rtn, bitz: 4}"), "{file}", "unknown key `bitz`",
      "Did you mean `bits`?"),
    C("rtn-bits-0", stage("{type: quantize, method: rtn, bits: 0}"), "{file}", "`bits`"),
    C("rtn-bits-99", stage("{type: quantize, method: rtn, bits: 99}"), "{file}", "`bits`"),
    C("rtn-bits-string", stage("{type: quantize, method: rtn, bits: four}"), "{file}", "`bits`"),
    C("rtn-bits-nan", stage("{type: quantize, method: rtn, bits: .nan}"), "{file}", "`bits`"),
    C("rtn-bits-inf", stage("{type: quantize, method: rtn, bits: .inf}"), "{file}", "`bits`"),
    C("rtn-group-negative", stage("{type: quantize, method: rtn, group_size: -64}"), "{file}", "`group_size`"),
    C("rtn-group-zero", stage("{type: quantize, method: rtn, group_size: 0}"), "{file}", "`group_size`"),
    C("rtn-skip-bad-regex", stage("{type: quantize, method: rtn, skip: ['(']}"), "{file}", "skip"),
    C("rtn-skip-number", stage("{type: quantize, method: rtn, skip: 5}"), "{file}", "skip"),
    C("gptq-group-zero", stage("{type: quantize, method: gptq, group_size: 0}"), "{file}", "group_size"),
    C("gptq-damp-negative", stage("{type: quantize, method: gptq, damp_percent: -1}"), "{file}", "damp_percent"),
    C("gptq-calib-typo", stage("{type: quantize, method: gptq, calibration: {sampels: 4}}"), "{file}",
      "unknown key `sampels` in `calibration`", "Did you mean `samples`?"),
    C("gptq-calib-samples-0", stage("{type: quantize, method: gptq, calibration: {samples: 0}}"), "{file}",
      "calibration.samples"),
    C("gptq-calib-missing-file", stage("{type: quantize, method: gptq, calibration: {source: nope.txt}}"), "{file}",
      "no such file", "nope.txt"),
    C("gptq-calib-bad-builtin", stage("{type: quantize, method: gptq, calibration: {source: 'builtin:nope'}}"),
      "{file}", "calibration"),
    C("hqq-group-zero", stage("{type: quantize, method: hqq, group_size: 0}"), "{file}", "group_size"),
    C("torchao-group-odd", stage("{type: quantize, method: torchao-int4wo, group_size: 7}"), "{file}", "group_size"),
    C("llmc-smoothing-2", stage("{type: quantize, method: llmc-w8a8, smoothing_strength: 2}"), "{file}",
      "smoothing_strength"),
    # prune
    C("prune-no-method", stage("{type: prune}"), "{file}", "no `method:` given"),
    C("prune-sparsity-2", stage("{type: prune, method: magnitude, sparsity: 2}"), "{file}", "sparsity"),
    C("prune-sparsity-neg", stage("{type: prune, method: magnitude, sparsity: -0.5}"), "{file}", "sparsity"),
    C("prune-bad-pattern", stage("{type: prune, method: magnitude, pattern: '5:4'}"), "{file}", "pattern"),
    C("prune-pattern-text", stage("{type: prune, method: magnitude, pattern: half}"), "{file}", "pattern"),
    C("wanda-missing-calib", stage("{type: prune, method: wanda, sparsity: 0.5, calibration: {source: x.jsonl}}"),
      "{file}", "no such file", "x.jsonl"),
    # lora
    C("lora-no-objective", stage("{type: lora}"), "{file}", "`objective` is required"),
    C("lora-bad-objective", stage("{type: lora, objective: magic}"), "{file}", "objective"),
    C("lora-data-typo", stage("{type: lora, objective: sft, data: {sampels: 10}}"), "{file}",
      "unknown key `sampels` in `data`", "Did you mean `samples`?"),
    C("lora-data-missing-file", stage("{type: lora, objective: sft, data: {source: missing.jsonl}}"), "{file}",
      "no such file", "missing.jsonl"),
    C("lora-data-empty-file", stage("{type: lora, objective: sft, data: {source: empty.jsonl}}"), "{file}",
      "is empty", files={"empty.jsonl": ""}),
    C("lora-r-negative", stage("{type: lora, objective: sft, r: -4}"), "{file}", "`r`"),
    C("lora-r-zero", stage("{type: lora, objective: sft, r: 0}"), "{file}", "`r`"),
    C("lora-lr-negative", stage("{type: lora, objective: sft, lr: -0.1}"), "{file}", "`lr`"),
    C("lora-lr-nan", stage("{type: lora, objective: sft, lr: .nan}"), "{file}", "`lr`"),
    C("lora-steps-zero", stage("{type: lora, objective: sft, steps: 0}"), "{file}", "steps"),
    C("lora-dropout-2", stage("{type: lora, objective: sft, dropout: 2}"), "{file}", "dropout"),
    C("lora-bad-merge", stage("{type: lora, objective: sft, merge: melt}"), "{file}", "merge"),
    C("lora-bad-init", stage("{type: lora, objective: sft, init: random}"), "{file}", "init"),
    C("lora-batch-zero", stage("{type: lora, objective: sft, batch_size: 0}"), "{file}", "batch_size"),
    C("lora-generate-typo", stage("{type: lora, objective: distill, generate: {new_tokenz: 4}}"), "{file}",
      "unknown key `new_tokenz` in `generate`"),
    C("lora-accelerate-typo", stage("{type: lora, objective: sft, accelerate: {num_procs: 2}}"), "{file}",
      "unknown key `num_procs` in `accelerate`"),
    C("lora-target-bad-regex", stage("{type: lora, objective: sft, target_modules: ['[']}"), "{file}",
      "target_modules"),
    # evaluate
    C("eval-unknown-key", stage("{type: evaluate, taks: [pydoc_ppl]}"), "{file}", "unknown key `taks`",
      "Did you mean `tasks`?"),
    C("eval-limit-zero", stage("{type: evaluate, limit: 0}"), "{file}", "`limit`"),
    C("eval-limit-string", stage("{type: evaluate, limit: all}"), "{file}", "`limit`"),
    C("eval-fewshot-negative", stage("{type: evaluate, num_fewshot: -1}"), "{file}", "num_fewshot"),
    C("eval-batch-zero", stage("{type: evaluate, batch_size: 0}"), "{file}", "batch_size"),
    C("eval-task-twice", stage("{type: evaluate, tasks: [pydoc_ppl, pydoc_ppl]}"), "{file}", "listed twice"),
    C("eval-task-unknown", stage("{type: evaluate, tasks: [hellaswagg]}"), "{file}", "hellaswagg"),
    C("eval-tasks-string", stage("{type: evaluate, tasks: pydoc_ppl}"), "{file}", "tasks"),
    C("eval-nothing", stage("{type: evaluate, tasks: [], perplexity: null}"), "{file}", "nothing to evaluate"),
    C("eval-ppl-typo", stage("{type: evaluate, perplexity: {ctx: 8}}"), "{file}", "unknown key `ctx` in "
      "`perplexity`"),
    C("eval-ppl-stride", stage("{type: evaluate, perplexity: {ctx_len: 8, stride: 16}}"), "{file}", "stride"),
    C("eval-ppl-corpus-pdf", stage("{type: evaluate, perplexity: {corpus: x.pdf}}"), "{file}", "corpus"),
    C("eval-ppl-corpus-missing", stage("{type: evaluate, perplexity: {corpus: gone.txt}}"), "{file}",
      "no such file", "gone.txt"),
    C("eval-bad-backend", stage("{type: evaluate, backend: tgi}"), "{file}", "backend"),
    C("eval-vllm-block-hf", stage("{type: evaluate, vllm: {kv_cache_gib: 2}}"), "{file}", "backend: vllm"),
    C("eval-kl-string", stage("{type: evaluate, kl: maybe}"), "{file}", "`kl`"),
    C("eval-image-data-llm", stage("{type: evaluate, data: {source: 'builtin:digits'}}"), "{file}", "data"),
    # benchmark
    C("bench-batch-zero", stage("{type: benchmark, batch_sizes: [0]}"), "{file}", "batch_sizes"),
    C("bench-batch-empty", stage("{type: benchmark, batch_sizes: []}"), "{file}", "batch_sizes"),
    C("bench-batch-huge", stage("{type: benchmark, batch_sizes: [100000000]}"), "{file}", "batch_sizes"),
    C("bench-prompt-zero", stage("{type: benchmark, prompt_tokens: 0}"), "{file}", "prompt_tokens"),
    C("bench-new-one", stage("{type: benchmark, new_tokens: 1}"), "{file}", "new_tokens"),
    C("bench-new-huge", stage("{type: benchmark, new_tokens: 100000000}"), "{file}", "new_tokens"),
    C("bench-repeats-negative", stage("{type: benchmark, repeats: -5}"), "{file}", "repeats"),
    C("bench-warmup-negative", stage("{type: benchmark, warmup: -1}"), "{file}", "warmup"),
    C("bench-bad-backend", stage("{type: benchmark, backends: [tgi]}"), "{file}", "backends"),
    C("bench-compare-missing", stage("{type: benchmark, compare: [nope.yaml]}"), "{file}", "nope.yaml"),
    C("bench-vllm-typo", stage("{type: benchmark, backends: [hf], vllm: {kv_cache: 1}}"), "{file}",
      "unknown key `kv_cache` in `vllm`"),
    # export
    C("export-bad-format", stage("{type: export, format: onnx}"), "{file}", "format"),
    C("export-unknown-key", stage("{type: export, formt: hf}"), "{file}", "unknown key `formt`"),
    C("export-nf4-ct", head("  - {type: quantize, method: bnb-nf4}\n  - {type: export, format: compressed-tensors}\n"),
      "{file}", "stages[1]"),
]

# ---------------------------------------------------------------------------------------------------------------------
# --set overrides (on a valid recipe)

SMOKE = str(ROOT / "recipes" / "tiny-smoke.yaml")


def S(id, item, *expect) -> Case:
    return C(id, None, *expect, args=("validate", SMOKE, "--set", item), kind="set")


SET_CASES = [
    S("set-unclosed-list", "stages.0.bits=[1", "--set 'stages.0.bits=[1'", "not valid YAML"),
    S("set-unclosed-map", "stages.0={type: quantize", "--set", "not valid YAML"),
    S("set-tab-value", "stages.0.bits=\t4", "--set", "stages.0.bits"),
    S("set-tab-in-flow", "stages.0={type:\tquantize,\tmethod: rtn}", "--set"),
    S("set-no-equals", "stages.0.bits", "expected KEY=VALUE"),
    S("set-empty-key", "=4", "not a dotted recipe key"),
    S("set-double-dot", "stages..bits=4", "not a dotted recipe key"),
    S("set-trailing-dot", "stages.0.=4", "not a dotted recipe key"),
    S("set-index-out-of-range", "stages.99.bits=4", "stages.99", "not an index"),
    S("set-index-not-number", "stages.x.bits=4", "stages.x", "not an index"),
    S("set-through-scalar", "name.x=4", "`name` is a value"),
    S("set-bad-type", "stages.0.bits=nine", "`bits`"),
    S("set-bad-value", "stages.0.bits=1", "`bits`"),
    S("set-unknown-key", "stages.0.bitz=4", "unknown key `bitz`"),
    S("set-alias-bomb", "stages.0.skip=[&a [x,x,x,x,x,x,x,x,x], " + ", ".join(
        f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdef", "bcdefg")) + "]", "--set", "alias bomb"),
    S("set-deep-value", "stages.0.skip=" + "[" * 5000, "--set", "nested more than 64"),
    S("set-duplicate-key", "stages.0={type: quantize, type: prune}", "--set", "given twice"),
    S("set-threads-huge", "threads=99999999", "`threads`"),
    S("set-stage-scalar", "stages.0=5", "stages[0] must be a mapping"),
    S("set-stages-null", "stages=", "stages"),
    S("set-python-tag", "name=!!python/name:os.system", "--set", "not valid YAML"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Output folders (in-process: refused before anything runs; the fault tests cover disks, locks and --fresh more)


def Out(id, args, *expect, files=None) -> Case:
    return C(id, stage("{type: evaluate, tasks: []}"), *expect, args=args, files=files, kind="output")


OUTPUT_CASES = [
    Out("output-is-file", ("run", "{file}", "--output", "{dir}/taken.txt", "-q"), "taken.txt", "is a file",
      files={"taken.txt": "mine"}),
    Out("output-under-file", ("run", "{file}", "--output", "{dir}/taken.txt/run", "-q"), "lies under",
      files={"taken.txt": "mine"}),
    Out("fresh-foreign-folder", ("run", "{file}", "--output", "{dir}/mine", "--fresh", "-q"), "is not a run folder",
      "will not delete", files={"mine/thesis.tex": "years of work"}),
    Out("foreign-folder", ("run", "{file}", "--output", "{dir}/mine", "-q"), "is not a run folder",
      "will not write into", files={"mine/thesis.tex": "years of work"}),
    Out("another-recipes-run", ("run", "{file}", "--output", "{dir}/run", "-q"), "holds a run of recipe `other`",
      "--fresh", files={"run/manifest.json": '{"recipe": "other", "stages": []}'}),
    Out("fresh-recipe-folder", ("run", "{file}", "--output", "{dir}", "--fresh", "-q"), "is not a run folder"),
    Out("sweep-output-is-file", ("sweep", "{dir}/s.yaml", "--output", "{dir}/taken.txt"), "taken.txt", "is a file",
      files={"taken.txt": "mine", "s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n"}),
    Out("sweep-fresh-foreign", ("sweep", "{dir}/s.yaml", "--output", "{dir}/mine", "--fresh"), "is not a sweep folder",
      files={"mine/notes.md": "mine", "s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n"}),
]

# ---------------------------------------------------------------------------------------------------------------------
# Sweep files


def W(id, text, *expect, files=None) -> Case:
    return C(id, stage("{type: evaluate, tasks: []}"), *expect, args=("sweep", "{dir}/s.yaml", "--dry-run"),
             files={"s.yaml": text, **(files or {})}, kind="sweep")


SW = "name: s\nbase: r.yaml\n"
SWEEP_CASES = [
    W("sweep-empty", "", "s.yaml", "a sweep is a mapping"),
    W("sweep-list", "- 1\n", "s.yaml", "a sweep is a mapping"),
    W("sweep-binary", "\x00\x01\x02", "s.yaml", "binary file"),
    W("sweep-no-points", SW, "s.yaml", "give a `grid`"),
    W("sweep-no-base", "name: s\ngrid: {seed: [1]}\n", "s.yaml", "`base` is required"),
    W("sweep-missing-base", "name: s\nbase: gone.yaml\ngrid: {seed: [1]}\n", "s.yaml", "no recipe file"),
    W("sweep-base-binary", "name: s\nbase: b.yaml\ngrid: {seed: [1]}\n", "b.yaml", "binary file",
      files={"b.yaml": b"\x00\xff"}),
    W("sweep-base-list", "name: s\nbase: b.yaml\ngrid: {seed: [1]}\n", "b.yaml", "a recipe is a mapping",
      files={"b.yaml": "- 1\n"}),
    W("sweep-unknown-key", SW + "lst: []\n", "unknown key `lst`", "Did you mean `list`?"),
    W("sweep-internal-names", SW + "list_: []\n", "unknown key `list_`", "Allowed keys:"),
    W("sweep-grid-empty-values", SW + "grid: {seed: []}\n", "grid key `seed` has no values"),
    W("sweep-grid-not-list", SW + "grid: {seed: 5}\n", "grid"),
    W("sweep-grid-bad-key", SW + "grid: {'stages..bits': [4]}\n", "not a dotted recipe key"),
    W("sweep-grid-name", SW + "grid: {name: [a, b]}\n", "the sweep names each recipe"),
    W("sweep-grid-huge", SW + "grid: {seed: " + str(list(range(100))) + ", threads: " + str(list(range(1, 101))) +
      "}\n", "10,000 runs", "max_runs: 256"),
    W("sweep-grid-bad-index", SW + "grid: {stages.9.bits: [4]}\n", "stages.9"),
    W("sweep-list-bomb", SW + "list:\n" + "".join(f"  - &l{i} {{seed: [{', '.join([f'*l{i-1}'] * 9) if i else 1}]}}\n"
                                                  for i in range(8)), "alias bomb"),
    W("sweep-list-bad-entry", SW + "list: [{stages.0.tasks: 5}]\n", "list[0]", "tasks"),
    W("sweep-list-name-number", SW + "list: [{name: 5, seed: 1}]\n", "`name` must be a string"),
    W("sweep-list-not-mapping", SW + "list: [5]\n", "list"),
    W("sweep-set-bad", SW + "set: {'': 1}\ngrid: {seed: [1]}\n", "not a dotted recipe key"),
    W("sweep-set-list", SW + "set: [threads=1]\ngrid: {seed: [1]}\n", "`set`"),
    W("sweep-executor-typo", SW + "grid: {seed: [1]}\nexecutor: {type: ray, num_cpu: 1}\n",
      "unknown key `num_cpu` in `executor`", "Did you mean `num_cpus`?"),
    W("sweep-executor-unknown", SW + "grid: {seed: [1]}\nexecutor: slurm\n", "executor"),
    W("sweep-retries-negative", SW + "grid: {seed: [1]}\nexecutor: {type: local, retries: -1}\n", "retries"),
    W("sweep-recommend-typo", SW + "grid: {seed: [1]}\nrecommend: [{pick: smallest, max_size: 3}]\n",
      "unknown key `max_size` in `recommend.0`"),
    W("sweep-recommend-bad-pick", SW + "grid: {seed: [1]}\nrecommend: [{pick: cheapest}]\n", "pick"),
    W("sweep-recommend-bad-percent", SW + "grid: {seed: [1]}\nrecommend: [{pick: smallest, "
      "min_quality_recovery: lots%}]\n", "not a percentage"),
    W("sweep-bad-naming", SW + "grid: {seed: [1, 2]}\nnaming: '{nope}'\n", "naming"),
    W("sweep-name-clash", SW + "grid: {seed: [1, 2]}\nnaming: same\n", "is given to"),
    W("sweep-bad-sort", SW + "grid: {seed: [1]}\nsort_by: vibes\n", "sort_by"),
    W("sweep-max-runs-zero", SW + "grid: {seed: [1]}\nmax_runs: 0\n", "max_runs"),
    W("sweep-duplicate-key", SW + "grid: {seed: [1]}\ngrid: {seed: [2]}\n", "`grid` is given twice"),
    W("sweep-all-invalid", SW + "grid: {stages.0.limit: [0, -1]}\n", "No recipe of the sweep validates"),
    W("sweep-deep", SW + "grid: {seed: " + "[" * 3000 + "]" * 3000 + "}\n", "nested more than 64"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Other commands


def X(id, args, *expect, files=None) -> Case:
    return C(id, None, *expect, args=args, files=files, kind="cli")


CLI_CASES = [
    X("serve-corrupt-manifest", ("serve", "{dir}/run", "--port", "0"), "manifest.json` is unreadable",
      files={"run/manifest.json": "{not json"}),
    X("serve-manifest-list", ("serve", "{dir}/run", "--port", "0"), "manifest.json` is unreadable",
      files={"run/manifest.json": "[1]"}),
    X("serve-manifest-deep", ("serve", "{dir}/run", "--port", "0"), "manifest.json` is unreadable",
      files={"run/manifest.json": "[" * 100_000}),
    X("serve-run-without-model", ("serve", "{dir}/run", "--port", "0"), "has no stage that produced a model",
      files={"run/manifest.json": '{"stages": []}'}),
    X("serve-not-a-model", ("serve", "{dir}/stuff", "--port", "0"), "neither a run folder",
      files={"stuff/a.txt": "x"}),
    X("serve-missing", ("serve", "{dir}/nothing", "--port", "0"), "does not exist"),
    X("serve-bad-dtype", ("serve", "{dir}", "--dtype", "fp32"), "--dtype"),
    X("serve-bad-port", ("serve", "{dir}", "--port", "99999"), "--port"),
    X("sweep-bad-executor-flag", ("sweep", "{dir}/s.yaml", "--executor", "slurm", "--dry-run"), "slurm",
      files={"s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n",
             "r.yaml": stage("{type: evaluate, tasks: []}")}),
    X("sweep-address-local", ("sweep", "{dir}/s.yaml", "--executor", "local", "--address", "auto", "--dry-run"),
      "--address", files={"s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n",
                          "r.yaml": stage("{type: evaluate, tasks: []}")}),
    X("unknown-command", ("compress", "x"), "No such command"),
    X("recipe-name-too-long", ("validate", "a" * 5000 + ".yaml"), "File name too long"),
    X("output-name-too-long", ("run", SMOKE, "--output", "{dir}/" + "a" * 300, "-q"), "File name too long"),
    C("cache-under-a-file", stage("{type: evaluate, tasks: []}"), "LLMCOMPRESS_CACHE", "Not a directory",
      args=("run", "{file}", "--output", "{dir}/out", "-q"), kind="cli", env={"LLMCOMPRESS_CACHE": "/etc/passwd/x"}),
    C("vllm-python-missing", stage("{type: benchmark, backends: [vllm]}"), "{file}", "LLMCOMPRESS_VLLM_PYTHON",
      kind="cli", env={"LLMCOMPRESS_VLLM_PYTHON": "/nonexistent/python"}),
    X("run-unknown-option", ("run", "x.yaml", "--fast"), "No such option"),
]

ALL = FILE_CASES + TOP_CASES + STAGE_CASES + SET_CASES + OUTPUT_CASES + SWEEP_CASES + CLI_CASES


def materialize(case: Case, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    recipe = tmp_path / "r.yaml"
    if case.text is not None:
        (recipe.write_bytes if isinstance(case.text, bytes) else recipe.write_text)(case.text)
    for name, content in case.files.items():
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    fill = {"file": str(recipe), "dir": str(tmp_path)}
    return [_fill(a, fill) for a in case.args], fill


def _fill(text: str, fill: dict[str, str]) -> str:
    """``{file}`` and ``{dir}`` filled in; other braces (YAML flow mappings) left alone."""
    for k, v in fill.items():
        text = text.replace("{" + k + "}", v)
    return text


def check(output: str, code: int, case: Case, fill: dict[str, str]) -> None:
    assert code == 2, f"{case.id}: exit {code}, expected 2:\n{output[-3000:]}"
    assert not CRASH.search(output), f"{case.id}: a traceback or a bare exception:\n{output[-3000:]}"
    flat = " ".join(output.split())  # rich wraps long lines
    for fragment in case.expect:
        want = " ".join(_fill(fragment, fill).split())
        assert want in flat, f"{case.id}: the message lacks {want!r}:\n{output}"


def test_the_corpus_is_large_and_covers_every_kind():
    kinds = {c.kind for c in ALL}
    assert len(ALL) >= 150 and kinds == {"recipe", "set", "output", "sweep", "cli"}
    assert len({c.id for c in ALL}) == len(ALL)  # ids are unique


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_exits_2_with_a_message_that_names_the_place(case, tmp_path, monkeypatch):
    from llmcompress.cli import app

    monkeypatch.chdir(tmp_path)  # a run that slipped through would write runs/ here, not in the repository
    args, fill = materialize(case, tmp_path)
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, args, env={k: _fill(v, fill) for k, v in case.env.items()})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{case.id}: uncaught {type(result.exception).__name__}:\n{tb[-3000:]}")
    check(result.output, result.exit_code, case, fill)
    assert time.perf_counter() - t0 < 30, f"{case.id}: refused only after {time.perf_counter() - t0:.0f} s"
    assert not (tmp_path / "runs").exists() or case.kind == "output", f"{case.id}: something ran"


#: A sample through the real entry point (``main()``: SIGTERM handler, the last-resort error handler).
REAL = ["non-utf8", "deep-nesting-flow", "alias-bomb-top", "duplicate-stage-key", "threads-huge", "gguf-not-gguf",
        "lora-data-missing-file", "lora-data-typo", "set-unclosed-list", "output-under-file", "sweep-list-bomb",
        "sweep-grid-huge", "serve-corrupt-manifest", "dev-zero", "cache-under-a-file", "output-name-too-long"]


@pytest.mark.parametrize("case_id", REAL)
def test_the_real_entry_point_agrees(case_id, tmp_path):
    case = next(c for c in ALL if c.id == case_id)
    args, fill = materialize(case, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **case.env}
    r = subprocess.run([sys.executable, "-m", "llmcompress.cli", *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    check(r.stdout + r.stderr, r.returncode, case, fill)
