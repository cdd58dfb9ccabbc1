"""The bad-input corpus: malformed recipes, sweeps and command lines of every kind a hostile but fair user tries.

Each case must end with exit code 2, one message that names the place (the file, the line or stage and key, the
option) and no traceback, before any weights load, within a time limit (a hang fails the case), and without
deleting or changing any file that was there before. Most cases run in this process through typer's CliRunner (the
real command functions; fast); cases marked ``proc`` (a server could start, or a read could fill memory) and
``test_the_real_entry_point_*`` run through ``python -m llmcompress.cli`` in their own process group.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
#: What a traceback or an unhandled exception looks like in the output.
CRASH = re.compile(r"Traceback|^\w+(Error|Exception|Warning):|\b(RecursionError|UnicodeDecodeError|UnicodeEncodeError|"
                   r"MemoryError|KeyError|AttributeError|IndexError|OverflowError|ZeroDivisionError)\b", re.MULTILINE)
#: pydantic's own rendering of an error (the message should be ours, in the user's words).
PYDANTIC = re.compile(r"errors\.pydantic\.dev|validation errors? for \w+|input_value=|\[type=\w+")
#: Internal field names that must never reach a message (unless the user typed them).
INTERNAL = ("list_", "set_")
#: Seconds an in-process case may take before it counts as a hang; a subprocess case gets PROC_TIMEOUT.
TIMEOUT, PROC_TIMEOUT = 30, 90


def head(stages: str, extra: str = "") -> str:
    return f"name: r\nmodel: tiny-random-llama\nthreads: 1\n{extra}stages:\n{stages}"


def stage(text: str) -> str:
    return head(f"  - {text}\n")


@dataclass
class Case:
    """``text`` (str or bytes) is written to ``r.yaml``; ``args`` replace the default ``validate {file}``.
    ``expect``: fragments the message must hold (``{file}`` and ``{dir}`` are filled in). ``setup(dir)`` makes what
    plain files cannot (a FIFO, an immutable folder) and may return a cleanup. ``proc``: run only as a subprocess.
    ``absent``: fragments that must not be in the output."""

    id: str
    text: str | bytes | None = None
    expect: tuple[str, ...] = ()
    args: tuple[str, ...] = ("validate", "{file}")
    files: dict[str, str | bytes] = field(default_factory=dict)  # more files beside the recipe
    kind: str = "recipe"
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], Callable[[], object] | None] | None = None
    proc: bool = False
    absent: tuple[str, ...] = ()  # fragments that must not be in the output (e.g. a server that started anyway)


def C(id, text=None, *expect, args=("validate", "{file}"), files=None, kind="recipe", env=None, setup=None,
      proc=False) -> Case:
    return Case(id, text, tuple(expect), tuple(args), files or {}, kind, env or {}, setup, proc)


def fifo(name: str):
    """A named pipe ``name`` (opening it for reading blocks until a writer comes: a hang unless it is refused)."""

    def make(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(d / name)

    return make


def immutable(name: str):
    """A folder nothing can be written into, even by root (``chattr +i``); the cleanup lifts it."""

    def make(d: Path):
        folder = d / name
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if r.returncode:
            pytest.fail(f"chattr +i failed ({r.stderr.strip()}): this case needs root on a file system with "
                        "attributes, as the fault tests do")
        return lambda: subprocess.run(["chattr", "-i", str(folder)], capture_output=True)

    return make


def symlink(name: str, target: str):
    def make(d: Path) -> None:
        (d / name).symlink_to(target)

    return make


BIG = "9" * 5000  # an integer literal over Python's 4300-digit int() limit


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

FILE_CASES += [
    C("int-over-4300-digits", f"name: r\nmodel: tiny-random-llama\nthreads: {BIG}\nstages: [{{type: evaluate}}]\n",
      "{file}", "line 3"),
    C("int-over-4300-digits-in-stage", head(f"  - type: quantize\n    method: rtn\n    bits: {BIG}\n"), "{file}",
      "line 7"),
    C("negative-int-over-4300-digits", head("  - {type: evaluate}\n", f"seed: -{BIG}\n"), "{file}", "line 4"),
    C("utf16-file", "name: r\nmodel: tiny-random-llama\n".encode("utf-16"), "{file}"),
    C("bom-then-tab", "\ufeffname: r\nstages:\n\t- {type: evaluate}\n".encode(), "{file}", "line 3"),
    C("control-characters", "name: r\x07\x1b[31m\nmodel: tiny-random-llama\n", "{file}", "line 1"),
    C("yaml-directive", "%YAML 9.9\n---\nname: r\n", "{file}", "not valid YAML"),
    C("unhashable-key", "? [a, b]\n: 1\nname: r\n", "{file}"),
    C("crlf-duplicate-key", "name: r\r\nname: s\r\nmodel: x\r\n", "{file}", "line 2", "given twice"),
    C("int-key-top", "name: r\nmodel: tiny-random-llama\n4: x\nstages: [{type: evaluate}]\n", "{file}",
      "`4`"),
    C("null-key-top", "name: r\nmodel: tiny-random-llama\n~: x\nstages: [{type: evaluate}]\n", "{file}"),
    C("bool-key-top", "name: r\nmodel: tiny-random-llama\nyes: x\nstages: [{type: evaluate}]\n", "{file}", "True"),
    C("int-key-in-stage", stage("{type: quantize, method: rtn, 4: bits}"), "{file}", "stages[0]", "`4`"),
    C("deep-nesting-in-stage", stage("{type: quantize, method: rtn, skip: " + "[" * 100 + "]" * 100 + "}"),
      "{file}", "nested more than 64"),
    C("fifo-recipe", None, "{dir}/pipe.yaml", "not a regular file", args=("validate", "{dir}/pipe.yaml"),
      setup=fifo("pipe.yaml")),
    C("run-fifo-recipe", None, "{dir}/pipe.yaml", "not a regular file", args=("run", "{dir}/pipe.yaml", "-q"),
      setup=fifo("pipe.yaml")),
    C("run-dev-zero", None, "/dev/zero", "not a regular file", args=("run", "/dev/zero", "-q")),
    C("dev-null", None, "/dev/null", "not a regular file", args=("validate", "/dev/null")),
    C("run-folder-as-recipe", None, "{dir}", "is a folder", args=("run", "{dir}", "-q")),
    C("symlink-loop", None, "loop.yaml", args=("validate", "{dir}/loop.yaml"), setup=symlink("loop.yaml", "loop.yaml")),
    C("dangling-symlink", None, "gone.yaml", args=("validate", "{dir}/gone.yaml"),
      setup=symlink("gone.yaml", "nowhere.yaml")),
    C("path-through-a-file", "name: r\n", "x.yaml", args=("validate", "{file}/x.yaml")),
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
      "not in the local Hugging Face cache"),
    C("model-name-too-long", "name: r\nmodel: " + "a" * 400 + "\nstages: [{type: evaluate}]\n", "{file}",
      "model.source", "longer than 255 bytes"),
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

M, EV = "model: tiny-random-llama\n", "stages: [{type: evaluate}]\n"
CFG = '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}'
_HDR = b'{"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 16384]}}'
#: A safetensors file whose header promises 16 KiB of data and holds 100 bytes (a download cut short).
TRUNCATED = len(_HDR).to_bytes(8, "little") + _HDR + b"\0" * 100
INDEX = '{"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors"}}'


def F(id, model, *expect, files=None, setup=None, proc=False) -> Case:
    """A recipe whose `model:` is ``model``."""
    return C(id, f"name: r\nmodel: {model}\n{EV}", *expect, files=files, setup=setup, proc=proc)


TOP_CASES += [
    # Numbers a run cannot use: numpy seeds take 0..2**32-1 and torch a 64-bit integer (Runtime.apply seeds both).
    C("seed-negative", head("  - {type: evaluate}\n", "seed: -1\n"), "{file}", "`seed`"),
    C("seed-over-2-32", head("  - {type: evaluate}\n", "seed: 4294967296\n"), "{file}", "`seed`"),
    C("seed-float", head("  - {type: evaluate}\n", "seed: 1.5\n"), "{file}", "`seed`"),
    C("seed-inf", head("  - {type: evaluate}\n", "seed: .inf\n"), "{file}", "`seed`"),
    C("threads-inf", f"name: r\n{M}threads: .inf\n{EV}", "{file}", "`threads`"),
    C("threads-nan", f"name: r\n{M}threads: .nan\n{EV}", "{file}", "`threads`"),
    C("threads-list", f"name: r\n{M}threads: [1]\n{EV}", "{file}", "`threads`"),
    C("name-empty", f"name: ''\n{M}{EV}", "{file}", "`name`"),
    C("name-null", f"name:\n{M}{EV}", "{file}", "`name`"),
    C("name-with-space", f"name: my run\n{M}{EV}", "{file}", "`name`"),
    C("name-too-long-for-a-folder", f"name: {'a' * 300}\n{M}{EV}", "{file}", "`name`"),
    C("dtype-number", f"name: r\n{M}dtype: 16\n{EV}", "{file}", "`dtype`"),
    C("device-list", f"name: r\n{M}device: [cpu]\n{EV}", "{file}", "`device`"),
    C("stages-null", f"name: r\n{M}stages:\n", "{file}", "stages"),
    C("stages-string", f"name: r\n{M}stages: evaluate\n", "{file}", "stages"),
    C("stage-type-list", stage("{type: [quantize]}"), "{file}", "stages[0]"),
    C("stage-type-mapping", stage("{type: {a: 1}}"), "{file}", "stages[0]"),
    C("stage-type-null", stage("{type: null}"), "{file}", "stages[0]"),
    C("method-mapping", stage("{type: quantize, method: {a: 1}}"), "{file}", "stages[0]", "method"),
    C("prune-method-list", stage("{type: prune, method: [magnitude]}"), "{file}", "stages[0]", "method"),
    C("compare-itself", stage("{type: benchmark, compare: [r.yaml]}"), "{file}", "compare"),
    F("model-null", "", "{file}", "model"),
    F("model-list", "[a, b]", "{file}", "model"),
    F("model-empty-mapping", "{}", "{file}", "model.source"),
    F("model-empty-string", "''", "{file}", "model"),
    F("model-is-the-recipe", "r.yaml", "{file}", "r.yaml"),
    F("model-dev-zero", "/dev/zero", "{file}", "/dev/zero", proc=True),
    F("model-gguf-fifo", "pipe.gguf", "{file}", "pipe.gguf", setup=fifo("pipe.gguf")),
    F("model-gguf-is-folder", "dir.gguf", "{file}", "dir.gguf", files={"dir.gguf/x.txt": "x"}),
    F("model-gguf-truncated", "t.gguf", "{file}", "t.gguf", files={"t.gguf": b"GGUF\x03\x00\x00\x00"}),
    F("model-gguf-file-on-builtin", "{source: tiny-random-llama, gguf_file: x.gguf}", "{file}", "gguf_file"),
    F("model-gguf-file-missing", "{source: ./m, gguf_file: nope.gguf}", "{file}", "nope.gguf",
      files={"m/notes.txt": "x"}),
    F("model-bad-task", "{source: tiny-random-llama, task: translation}", "{file}", "model.task"),
    F("model-trust-remote-code-text", "{source: tiny-random-llama, trust_remote_code: maybe}", "{file}",
      "trust_remote_code"),
    F("model-revision-list", "{source: tiny-random-llama, revision: [main]}", "{file}", "revision"),
    F("folder-config-binary", "./m", "{file}", "config.json", files={"m/config.json": b"\xff\xfe\x00\x01"}),
    F("folder-config-not-utf8", "./m", "{file}", "config.json", files={"m/config.json": b'{"a": "\xe9"}'}),
    F("folder-config-empty-object", "./m", "{file}", "config.json", files={"m/config.json": "{}"}),
    F("folder-config-fifo", "./m", "{file}", "config.json", setup=fifo("m/config.json")),
    F("folder-truncated-weights", "./m", "{file}", "model.safetensors",
      files={"m/config.json": CFG, "m/model.safetensors": TRUNCATED}),
    F("folder-missing-shard", "./m", "{file}", "model-00001-of-00002.safetensors",
      files={"m/config.json": CFG, "m/model.safetensors.index.json": INDEX}),
    F("folder-corrupt-shard-index", "./m", "{file}", "model.safetensors.index.json",
      files={"m/config.json": CFG, "m/model.safetensors.index.json": "{bad"}),
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
    C("gguf-unknown-type", stage("{type: quantize, method: gguf, gguf_type: Q4_KM}"), "{file}", "gguf_type",
      "unknown GGUF type `Q4_KM`", "Did you mean `Q4_K_M`?"),
    C("gguf-type-number", stage("{type: quantize, method: gguf, gguf_type: 4}"), "{file}", "gguf_type"),
    C("gguf-tensor-type-unknown", stage("{type: quantize, method: gguf, tensor_types: {attn_v: q9_0}}"), "{file}",
      "tensor_types", "unknown ggml type `q9_0`"),
    C("gguf-tensor-type-bad-regex", stage("{type: quantize, method: gguf, tensor_types: {'(': q8_0}}"), "{file}",
      "tensor_types", "regular expression"),
    C("gguf-iq2-without-imatrix", stage("{type: quantize, method: gguf, gguf_type: IQ2_XS, imatrix: false}"),
      "{file}", "needs an importance matrix", "imatrix: true"),
    C("gguf-skip", stage("{type: quantize, method: gguf, skip: [lm_head]}"), "{file}", "skip", "tensor_types"),
    C("gguf-llamacpp-not-set-up", stage("{type: quantize, method: gguf}"), "{file}", "stages[0]",
      "llmcompress setup llamacpp", env={"LLMCOMPRESS_LLAMACPP_DIR": "{dir}/no-llamacpp"}),
    C("gguf-calib-missing-file", stage("{type: quantize, method: gguf, calibration: {source: nope.txt}}"),
      "{file}", "no such file", "nope.txt"),
    C("gguf-target-bits-too-low", stage("{type: quantize, method: gguf, target_bits: 0.5}"), "{file}", "target_bits"),
    C("gguf-target-bits-text", stage("{type: quantize, method: gguf, target_bits: six}"), "{file}", "target_bits"),
    C("gguf-plan-type-unknown", stage("{type: quantize, method: gguf, target_bits: 5, plan_types: [q4_k, q7_k]}"),
      "{file}", "plan_types", "`q7_k`"),
    C("gguf-plan-type-twice", stage("{type: quantize, method: gguf, target_bits: 5, plan_types: [q8_0, Q8_0]}"),
      "{file}", "plan_types", "listed twice"),
    C("gguf-plan-types-empty", stage("{type: quantize, method: gguf, target_bits: 5, plan_types: []}"),
      "{file}", "plan_types is empty"),
    C("gguf-plan-types-without-target", stage("{type: quantize, method: gguf, plan_types: [q8_0]}"),
      "{file}", "apply to `target_bits` only"),
    C("gguf-target-bits-and-tensor-types",
      stage("{type: quantize, method: gguf, target_bits: 5, tensor_types: {attn_v: q8_0}}"), "{file}",
      "use one of them"),
    C("gguf-then-lora", head("  - {type: quantize, method: gguf}\n  - {type: lora, objective: distill}\n"), "{file}",
      "stages[1] (lora)", "a GGUF file", "Fix: put the lora stage before the gguf quantize stage"),
    C("gguf-plan-samples-over-calibration",
      stage("{type: quantize, method: gguf, target_bits: 5, plan_samples: 9, calibration: {samples: 8}}"),
      "{file}", "plan_samples (9)", "calibration.samples"),
    C("gguf-architecture-unsupported",
      "name: r\nmodel: ./m\nstages:\n  - {type: quantize, method: gguf}\n", "{file}", "stages[0]",
      "does not support the architecture ['FooForCausalLM']",
      files={"m/config.json": '{"architectures": ["FooForCausalLM"], "model_type": "foo"}'}),
    C("gguf-export-type-over-gguf",
      head("  - {type: quantize, method: gguf}\n  - {type: export, format: gguf, gguf_type: q8_0}\n"), "{file}",
      "already a Q4_K_M GGUF", "gguf_type"),
    C("bench-llamacpp-not-set-up", stage("{type: benchmark, backends: [hf, llamacpp]}"), "{file}",
      "backend llamacpp", "llmcompress setup llamacpp", env={"LLMCOMPRESS_LLAMACPP_DIR": "{dir}/no-llamacpp"}),
    C("bench-backend-unknown", stage("{type: benchmark, backends: [hf, llama]}"), "{file}", "backends"),
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

LORA = "{type: lora, objective: sft, "
DISTILL = "{type: lora, objective: distill, "
VLLM_EVAL = "{type: evaluate, tasks: [], backend: vllm, vllm: "
VLLM_BENCH = "{type: benchmark, backends: [hf, vllm], vllm: "

STAGE_CASES += [
    # quantize: every method's settings
    C("quant-method-typo", stage("{type: quantize, method: gtpq}"), "{file}", "Did you mean `gptq`?"),
    C("rtn-bits-float", stage("{type: quantize, method: rtn, bits: 4.5}"), "{file}", "`bits`"),
    C("rtn-bits-huge", stage("{type: quantize, method: rtn, bits: 1099511627776}"), "{file}", "`bits`"),
    C("rtn-bits-negative", stage("{type: quantize, method: rtn, bits: -4}"), "{file}", "`bits`"),
    C("rtn-symmetric-text", stage("{type: quantize, method: rtn, symmetric: maybe}"), "{file}", "symmetric"),
    C("rtn-skip-mapping", stage("{type: quantize, method: rtn, skip: {a: 1}}"), "{file}", "skip"),
    C("rtn-name-list", stage("{type: quantize, method: rtn, name: [1]}"), "{file}", "name"),
    C("gptq-bits-5", stage("{type: quantize, method: gptq, bits: 5}"), "{file}", "`bits`"),
    C("gptq-damp-1", stage("{type: quantize, method: gptq, damp_percent: 1}"), "{file}", "damp_percent"),
    C("gptq-calib-not-mapping", stage("{type: quantize, method: gptq, calibration: 5}"), "{file}", "calibration"),
    C("gptq-calib-seq-4", stage("{type: quantize, method: gptq, calibration: {seq_len: 4}}"), "{file}",
      "calibration.seq_len"),
    C("gptq-calib-skip-negative", stage("{type: quantize, method: gptq, calibration: {skip_tokens: -1}}"), "{file}",
      "calibration.skip_tokens"),
    C("gptq-calib-samples-text", stage("{type: quantize, method: gptq, calibration: {samples: lots}}"), "{file}",
      "calibration.samples"),
    C("gptq-calib-folder", stage("{type: quantize, method: gptq, calibration: {source: data.jsonl}}"), "{file}",
      "data.jsonl", files={"data.jsonl/x": "x"}),
    C("gptq-calib-fifo", stage("{type: quantize, method: gptq, calibration: {source: pipe.txt}}"), "{file}",
      "pipe.txt", setup=fifo("pipe.txt")),
    C("gptq-calib-bad-json", stage("{type: quantize, method: gptq, calibration: {source: c.jsonl}}"), "{file}",
      "c.jsonl", files={"c.jsonl": '{"text": "a"}\n{"text": \n'}),
    C("gptq-calib-binary", stage("{type: quantize, method: gptq, calibration: {source: c.txt}}"), "{file}",
      "c.txt", files={"c.txt": bytes(range(256))}),
    C("hqq-bits-5", stage("{type: quantize, method: hqq, bits: 5}"), "{file}", "`bits`"),
    C("hqq-axis-2", stage("{type: quantize, method: hqq, axis: 2}"), "{file}", "axis"),
    C("bnb-int8-threshold-0", stage("{type: quantize, method: bnb-int8, threshold: 0}"), "{file}", "threshold"),
    C("bnb-nf4-bits", stage("{type: quantize, method: bnb-nf4, bits: 4}"), "{file}", "unknown key `bits`"),
    C("bnb-fp4-double-quant-text", stage("{type: quantize, method: bnb-fp4, double_quant: maybe}"), "{file}",
      "double_quant"),
    C("dynamic-per-channel-text", stage("{type: quantize, method: dynamic-int8, per_channel: maybe}"), "{file}",
      "per_channel"),
    C("awq-n-grid-0", stage("{type: quantize, method: llmc-awq-w4a16, n_grid: 0}"), "{file}", "n_grid"),
    C("llmc-gptq-actorder-bad", stage("{type: quantize, method: llmc-gptq-w4a16, actorder: random}"), "{file}",
      "actorder"),
    C("llmc-gptq-dampening-1", stage("{type: quantize, method: llmc-gptq-w4a16, dampening_frac: 1}"), "{file}",
      "dampening_frac"),
    C("llmc-w8a8-dampening-0", stage("{type: quantize, method: llmc-w8a8, dampening_frac: 0}"), "{file}",
      "dampening_frac"),
    C("torchao-int8wo-group", stage("{type: quantize, method: torchao-int8wo, group_size: 64}"), "{file}",
      "unknown key `group_size`"),
    C("torchao-int4wo-group-text", stage("{type: quantize, method: torchao-int4wo, group_size: big}"), "{file}",
      "group_size"),
    # prune
    C("prune-method-typo", stage("{type: prune, method: magnitud, sparsity: 0.5}"), "{file}",
      "Did you mean `magnitude`?"),
    C("prune-sparsity-1", stage("{type: prune, method: magnitude, sparsity: 1}"), "{file}", "sparsity"),
    C("prune-sparsity-nan", stage("{type: prune, method: magnitude, sparsity: .nan}"), "{file}", "sparsity"),
    C("prune-sparsity-text", stage("{type: prune, method: magnitude, sparsity: half}"), "{file}", "sparsity"),
    C("prune-pattern-0-of-4", stage("{type: prune, method: magnitude, pattern: '0:4'}"), "{file}", "pattern"),
    C("prune-pattern-4-of-2", stage("{type: prune, method: magnitude, pattern: '4:2'}"), "{file}", "pattern"),
    C("prune-pattern-2-of-0", stage("{type: prune, method: magnitude, pattern: '2:0'}"), "{file}", "pattern"),
    C("prune-nothing-to-do", stage("{type: prune, method: magnitude}"), "{file}", "sparsity"),
    C("sparsegpt-block-0", stage("{type: prune, method: sparsegpt, sparsity: 0.5, block_size: 0}"), "{file}",
      "block_size"),
    C("sparsegpt-damp-0", stage("{type: prune, method: sparsegpt, sparsity: 0.5, dampening_frac: 0}"), "{file}",
      "dampening_frac"),
    C("structured-multiple-0", stage("{type: prune, method: structured, sparsity: 0.5, multiple_of: 0}"), "{file}",
      "multiple_of"),
    C("wanda-calib-typo", stage("{type: prune, method: wanda, sparsity: 0.5, calibration: {sampels: 4}}"), "{file}",
      "unknown key `sampels` in `calibration`", "Did you mean `samples`?"),
    # lora: the stage, its data, generate, accelerate and fsdp blocks
    C("lora-objective-typo", stage(LORA.replace("sft", "sfft") + "r: 4}"), "{file}", "objective", "sft"),
    C("lora-lr-inf", stage(LORA + "lr: .inf}"), "{file}", "`lr`"),
    C("lora-weight-decay-negative", stage(LORA + "weight_decay: -1}"), "{file}", "weight_decay"),
    C("lora-schedule-bad", stage(LORA + "schedule: exponential}"), "{file}", "schedule"),
    C("lora-warmup-negative", stage(LORA + "warmup_steps: -1}"), "{file}", "warmup_steps"),
    C("lora-epochs-0", stage(LORA + "epochs: 0}"), "{file}", "epochs"),
    C("lora-epochs-inf", stage(LORA + "epochs: .inf}"), "{file}", "epochs"),
    C("lora-steps-and-epochs", stage(LORA + "steps: 2, epochs: 1}"), "{file}", "steps", "epochs"),
    C("lora-grad-accum-0", stage(LORA + "grad_accum: 0}"), "{file}", "grad_accum"),
    C("lora-max-grad-norm-0", stage(LORA + "max_grad_norm: 0}"), "{file}", "max_grad_norm"),
    C("lora-temperature-0", stage(DISTILL + "temperature: 0}"), "{file}", "temperature"),
    C("lora-requantize-from-bad", stage(LORA + "requantize_from: thin-air}"), "{file}", "requantize_from"),
    C("lora-merge-list-bad", stage(LORA + "merge: [keep, melt]}"), "{file}", "merge"),
    C("lora-target-number", stage(LORA + "target_modules: 5}"), "{file}", "target_modules"),
    C("lora-r-text", stage(LORA + "r: sixteen}"), "{file}", "`r`"),
    C("lora-data-not-mapping", stage(LORA + "data: 5}"), "{file}", "data"),
    C("lora-data-seq-4", stage(LORA + "data: {seq_len: 4}}"), "{file}", "data.seq_len"),
    C("lora-data-samples-0", stage(LORA + "data: {samples: 0}}"), "{file}", "data.samples"),
    C("lora-data-skip-negative", stage(LORA + "data: {skip_tokens: -5}}"), "{file}", "data.skip_tokens"),
    C("lora-data-builtin-nope", stage(LORA + "data: {source: 'builtin:nope'}}"), "{file}", "builtin:nope"),
    C("lora-data-folder", stage(LORA + "data: {source: d.jsonl}}"), "{file}", "d.jsonl", files={"d.jsonl/x": "x"}),
    C("lora-data-fifo", stage(LORA + "data: {source: pipe.jsonl}}"), "{file}", "pipe.jsonl",
      setup=fifo("pipe.jsonl")),
    C("lora-data-dev-zero", stage(LORA + "data: {source: /dev/zero}}"), "{file}", "/dev/zero", proc=True),
    C("lora-data-bad-json", stage(LORA + "data: {source: d.jsonl}}"), "{file}", "d.jsonl",
      files={"d.jsonl": '{"prompt": "a", "response": "b"}\n{"prompt": "a"\n'}),
    C("lora-data-wrong-rows", stage(LORA + "data: {source: d.jsonl}}"), "{file}", "d.jsonl",
      files={"d.jsonl": '{"question": "a", "answer": "b"}\n'}),
    C("lora-data-not-utf8", stage(LORA + "data: {source: d.txt}}"), "{file}", "d.txt",
      files={"d.txt": "caf\xe9 au lait\n".encode("latin-1")}),
    C("lora-data-binary", stage(LORA + "data: {source: d.txt}}"), "{file}", "d.txt",
      files={"d.txt": b"\x00\x01\x02" * 100}),
    C("lora-data-only-blank", stage(LORA + "data: {source: d.txt}}"), "{file}", "d.txt",
      files={"d.txt": "\n\n   \n"}),
    C("lora-generate-temperature-0", stage(DISTILL + "generate: {temperature: 0}}"), "{file}",
      "generate.temperature"),
    C("lora-generate-new-0", stage(DISTILL + "generate: {new_tokens: 0}}"), "{file}", "generate.new_tokens"),
    C("lora-generate-prompt-0", stage(DISTILL + "generate: {prompt_tokens: 0}}"), "{file}",
      "generate.prompt_tokens"),
    C("lora-generate-batch-0", stage(DISTILL + "generate: {batch_size: 0}}"), "{file}", "generate.batch_size"),
    C("lora-accelerate-mixed-fp8", stage(LORA + "accelerate: {mixed_precision: fp8}}"), "{file}",
      "mixed_precision"),
    C("lora-accelerate-processes-0", stage(LORA + "accelerate: {num_processes: 0}}"), "{file}", "num_processes"),
    C("lora-accelerate-port-80", stage(LORA + "accelerate: {main_process_port: 80}}"), "{file}",
      "main_process_port"),
    C("lora-fsdp-version-3", stage(LORA + "accelerate: {fsdp: {version: 3}}}"), "{file}", "fsdp.version"),
    C("lora-fsdp-policy-bad", stage(LORA + "accelerate: {fsdp: {auto_wrap_policy: wrap_all}}}"), "{file}",
      "auto_wrap_policy"),
    C("lora-fsdp-min-params-0", stage(LORA + "accelerate: {fsdp: {min_num_params: 0}}}"), "{file}",
      "min_num_params"),
    C("lora-fsdp-state-dict-bad", stage(LORA + "accelerate: {fsdp: {state_dict_type: LOCAL}}}"), "{file}",
      "state_dict_type"),
    C("lora-fsdp-typo", stage(LORA + "accelerate: {fsdp: {versoin: 2}}}"), "{file}", "unknown key `versoin`",
      "Did you mean `version`?"),
    # evaluate
    C("eval-limit-negative", stage("{type: evaluate, limit: -1}"), "{file}", "`limit`"),
    C("eval-tasks-number", stage("{type: evaluate, tasks: [1]}"), "{file}", "tasks"),
    C("eval-tasks-mapping", stage("{type: evaluate, tasks: {a: 1}}"), "{file}", "tasks"),
    C("eval-kl-list", stage("{type: evaluate, kl: [1]}"), "{file}", "`kl`"),
    C("eval-ppl-not-mapping", stage("{type: evaluate, perplexity: 5}"), "{file}", "perplexity"),
    C("eval-ppl-ctx-1", stage("{type: evaluate, perplexity: {ctx_len: 1}}"), "{file}", "perplexity.ctx_len"),
    C("eval-ppl-stride-0", stage("{type: evaluate, perplexity: {stride: 0}}"), "{file}", "perplexity.stride"),
    C("eval-ppl-max-tokens-1", stage("{type: evaluate, perplexity: {max_tokens: 1}}"), "{file}",
      "perplexity.max_tokens"),
    C("eval-ppl-corpus-empty", stage("{type: evaluate, perplexity: {corpus: e.txt}}"), "{file}", "e.txt",
      files={"e.txt": ""}),
    C("eval-ppl-corpus-fifo", stage("{type: evaluate, perplexity: {corpus: pipe.txt}}"), "{file}", "pipe.txt",
      setup=fifo("pipe.txt")),
    C("eval-ppl-corpus-binary", stage("{type: evaluate, perplexity: {corpus: b.txt}}"), "{file}", "b.txt",
      files={"b.txt": bytes(range(256)) * 8}),
    C("eval-ppl-corpus-dev-zero", stage("{type: evaluate, perplexity: {corpus: /dev/zero}}"), "{file}", "/dev/zero",
      proc=True),
    C("eval-vllm-gpu-util-2", stage(VLLM_EVAL + "{gpu_memory_utilization: 2}}"), "{file}",
      "vllm.gpu_memory_utilization"),
    C("eval-vllm-max-len-8", stage(VLLM_EVAL + "{max_model_len: 8}}"), "{file}", "vllm.max_model_len"),
    C("eval-vllm-kv-0", stage(VLLM_EVAL + "{kv_cache_gib: 0}}"), "{file}", "vllm.kv_cache_gib"),
    C("eval-vllm-tp-0", stage(VLLM_EVAL + "{tensor_parallel_size: 0}}"), "{file}", "vllm.tensor_parallel_size"),
    C("eval-vllm-seqs-0", stage(VLLM_EVAL + "{max_num_seqs: 0}}"), "{file}", "vllm.max_num_seqs"),
    # benchmark
    C("bench-batch-negative", stage("{type: benchmark, batch_sizes: [-1]}"), "{file}", "batch_sizes"),
    C("bench-batch-text", stage("{type: benchmark, batch_sizes: [one]}"), "{file}", "batch_sizes"),
    C("bench-backends-string", stage("{type: benchmark, backends: hf}"), "{file}", "backends"),
    C("bench-prompt-negative", stage("{type: benchmark, prompt_tokens: -16}"), "{file}", "prompt_tokens"),
    C("bench-prompt-huge", stage("{type: benchmark, prompt_tokens: 200000}"), "{file}", "prompt_tokens"),
    C("bench-repeats-0", stage("{type: benchmark, repeats: 0}"), "{file}", "repeats"),
    C("bench-repeats-huge", stage("{type: benchmark, repeats: 100000}"), "{file}", "repeats"),
    C("bench-warmup-huge", stage("{type: benchmark, warmup: 101}"), "{file}", "warmup"),
    C("bench-memory-text", stage("{type: benchmark, memory: maybe}"), "{file}", "memory"),
    C("bench-compare-string", stage("{type: benchmark, compare: other.yaml}"), "{file}", "compare"),
    C("bench-compare-fifo", stage("{type: benchmark, compare: [pipe.yaml]}"), "{file}", "pipe.yaml",
      setup=fifo("pipe.yaml")),
    C("bench-vllm-gpu-util-0", stage(VLLM_BENCH + "{gpu_memory_utilization: 0}}"), "{file}",
      "vllm.gpu_memory_utilization"),
    C("bench-vllm-pp-0", stage(VLLM_BENCH + "{pipeline_parallel_size: 0}}"), "{file}",
      "vllm.pipeline_parallel_size"),
    # export
    C("export-format-typo", stage("{type: export, format: safetensor}"), "{file}", "format"),
    C("export-gguf-type-bad", stage("{type: export, format: gguf, gguf_type: q4_k}"), "{file}", "gguf_type"),
    C("export-card-text", stage("{type: export, card: maybe}"), "{file}", "card"),
    C("export-path-is-a-file", stage("{type: export, path: taken.txt}"), "{file}", "taken.txt",
      files={"taken.txt": "mine"}),
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

SET_CASES += [
    S("set-int-over-4300-digits", f"threads={BIG}", "--set", "threads"),
    S("set-negative-index-out-of-range", "stages.-9.bits=4", "stages.-9", "not an index"),
    S("set-index-bool", "stages.true.bits=4", "stages.true", "not an index"),
    S("set-index-float", "stages.0.5=4", "unknown key `5`"),
    S("set-through-list-by-name", "stages.bits=4", "stages.bits", "not an index"),
    S("set-key-only-tab", "\t=4", "not a dotted recipe key"),
    S("set-equals-only", "=", "not a dotted recipe key"),
    S("set-value-with-equals", "stages.0.bits==4", "`bits`"),
    S("set-stage-type-unknown", "stages.0.type=quantise", "unknown stage type `quantise`"),
    S("set-method-typo", "stages.0.method=gtpq", "Did you mean `gptq`?"),
    S("set-stages-scalar", "stages=5", "stages"),
    S("set-stages-empty-list", "stages=[]", "stages"),
    S("set-model-null", "model=", "model"),
    S("set-model-list", "model=[a]", "model"),
    S("set-model-missing-folder", "model=./no/such/folder", "not a builtin model"),
    S("set-seed-negative", "seed=-1", "`seed`"),
    S("set-threads-inf", "threads=.inf", "`threads`"),
    S("set-lora-data-typo", "stages.0={type: lora, objective: sft, data: {sampels: 3}}",
      "unknown key `sampels` in `data`", "Did you mean `samples`?"),
    S("set-lora-missing-data", "stages.0={type: lora, objective: sft, data: {source: missing.jsonl}}",
      "missing.jsonl"),
    S("set-deep-key", ".".join(["a"] * 3000) + "=1", "unknown key `a`"),
    S("set-huge-name", "name=" + "a" * 1_000_000, "`name`"),
    S("set-null-byte", "name=a\x00b", "--set"),
    S("set-lone-surrogate", "name=\udcff\udcfe", "--set"),
    S("set-tab-in-list-value", "stages.0.skip=[a,\tb", "--set", "not valid YAML"),
    S("set-multiline-value", "name=a\nb: c", "--set"),
    S("set-anchor-recursive", "stages.0.skip=&a [*a]", "--set", "recursive"),
    S("set-two-documents", "name=a\n---\nb", "--set", "not valid YAML"),
    C("run-set-unclosed-list", None, "--set", "not valid YAML", args=("run", SMOKE, "--set", "stages.0.bits=[1", "-q"),
      kind="set"),
    C("run-set-unknown-key", None, "unknown key `bitz`", args=("run", SMOKE, "--set", "stages.0.bitz=4", "-q"),
      kind="set"),
    C("run-set-bad-value", None, "`threads`", args=("run", SMOKE, "--set", "threads=100000000", "-q"), kind="set"),
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

KEEP = {"mine/thesis.tex": "years of work", "mine/logs/today.txt": "notes"}  # `logs` is a name runs write too
WEB = {"web/manifest.json": '{"name": "my-app", "icons": []}', "web/logs/access.log": "GET /", "web/report.md": "mine"}

OUTPUT_CASES += [
    # --fresh on a folder that is not a run folder: refused, and nothing there is deleted (the check after each case)
    Out("fresh-working-directory", ("run", "{file}", "--output", ".", "--fresh", "-q"), "is not a run folder",
      files={"thesis.tex": "years of work"}),
    Out("fresh-home-folder", ("run", "{file}", "--output", "{dir}/home", "--fresh", "-q"), "is not a run folder",
      files={"home/.bashrc": "alias ll='ls -l'", "home/notes/todo.md": "everything"}),
    Out("fresh-folder-with-files", ("run", "{file}", "--output", "{dir}/mine", "--fresh", "-q"), "is not a run folder",
      files=KEEP),
    Out("fresh-file", ("run", "{file}", "--output", "{dir}/taken.txt", "--fresh", "-q"), "taken.txt", "is a file",
      files={"taken.txt": "mine"}),
    Out("fresh-the-recipe-itself", ("run", "{file}", "--output", "{file}", "--fresh", "-q"), "{file}", "is a file"),
    Out("fresh-sweep-folder", ("run", "{file}", "--output", "{dir}/sw", "--fresh", "-q"), "not a run folder",
      files={"sw/sweep.json": "{}", "sw/leaderboard.md": "mine"}),
    # A web app's folder: its manifest.json is not a run's, and `logs/` and `report.md` are the user's.
    Out("fresh-foreign-manifest", ("run", "{file}", "--output", "{dir}/web", "--fresh", "-q"), "{dir}/web",
        "not a run folder", files=WEB),
    Out("resume-foreign-manifest", ("run", "{file}", "--output", "{dir}/web", "-q"), "{dir}/web", "not a run folder",
        files=WEB),
    Out("output-read-only-folder", ("run", "{file}", "--output", "{dir}/ro/run", "-q"), "{dir}/ro", "not writable"),
    Out("output-dev-null", ("run", "{file}", "--output", "/dev/null", "-q"), "/dev/null"),
    Out("output-under-dev-null", ("run", "{file}", "--output", "/dev/null/run", "-q"), "/dev/null"),
    Out("output-under-the-recipe", ("run", "{file}", "--output", "{file}/run", "-q"), "{file}"),
    Out("output-proc", ("run", "{file}", "--output", "/proc/self/run", "-q"), "/proc/self"),
    Out("sweep-fresh-working-directory", ("sweep", "{dir}/s.yaml", "--output", ".", "--fresh"),
      "is not a sweep folder", files={"s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n"}),
    Out("sweep-output-under-file", ("sweep", "{dir}/s.yaml", "--output", "{dir}/taken.txt/sw"), "taken.txt",
      files={"taken.txt": "mine", "s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n"}),
    Out("sweep-output-read-only", ("sweep", "{dir}/s.yaml", "--output", "{dir}/ro/sw"), "{dir}/ro", "not writable",
      files={"s.yaml": "name: s\nbase: r.yaml\ngrid: {seed: [1]}\n"}),
    C("run-name-too-long-for-a-folder", f"name: {'a' * 300}\n{M}stages: [{{type: evaluate, tasks: []}}]\n", "aaaa",
      args=("run", "{file}", "-q"), kind="output"),
]
for _c in OUTPUT_CASES:
    if _c.id == "fresh-home-folder":
        _c.env = {"HOME": "{dir}/home"}
    if _c.id in ("output-read-only-folder", "sweep-output-read-only"):
        _c.setup = immutable("ro")

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

G1 = "grid: {seed: [1]}\n"
RAY = SW + G1 + "executor: {type: ray, "

SWEEP_CASES += [
    # the sweep file itself
    W("sweep-non-utf8", b"name: s\xe9\nbase: r.yaml\n", "s.yaml", "not UTF-8"),
    W("sweep-tab-indent", SW + "grid:\n\tseed: [1]\n", "s.yaml", "line 4"),
    W("sweep-scalar", "42\n", "s.yaml", "a sweep is a mapping"),
    W("sweep-duplicate-grid-key", SW + "grid: {seed: [1], seed: [2]}\n", "s.yaml", "`seed` is given twice"),
    W("sweep-grid-bomb", BOMB + SW + "grid: {seed: *f}\n", "s.yaml", "alias bomb"),
    W("sweep-set-bomb", BOMB + SW + G1 + "set: {stages.0.tasks: *f}\n", "s.yaml", "alias bomb"),
    W("sweep-int-over-4300-digits", SW + f"grid: {{seed: [{BIG}]}}\n", "s.yaml", "line 3"),
    W("sweep-grid-binary-tag", SW + "grid: {seed: [1, !!binary AAAA]}\n", "s.yaml", "seed"),
    W("sweep-list-set-tag", SW + "list: [{seed: !!set {a}}]\n", "s.yaml", "seed"),
    W("sweep-set-timestamp", SW + G1 + "set: {threads: 2001-12-14}\n", "s.yaml", "threads"),
    C("sweep-fifo", stage("{type: evaluate, tasks: []}"), "{dir}/pipe.yaml", "not a regular file",
      args=("sweep", "{dir}/pipe.yaml", "--dry-run"), kind="sweep", setup=fifo("pipe.yaml")),
    C("sweep-folder", None, "{dir}", "is a folder", args=("sweep", "{dir}", "--dry-run"), kind="sweep"),
    C("sweep-dev-zero", None, "/dev/zero", "not a regular file", args=("sweep", "/dev/zero", "--dry-run"),
      kind="sweep"),
    C("sweep-missing-file", None, "nope.yaml", "no such sweep file", args=("sweep", "{dir}/nope.yaml", "--dry-run"),
      kind="sweep"),
    W("sweep-name-bad", "name: ../x\nbase: r.yaml\n" + G1, "s.yaml", "`name`"),
    W("sweep-name-number", "name: [1]\nbase: r.yaml\n" + G1, "s.yaml", "`name`"),
    # base
    W("sweep-base-number", "name: s\nbase: 5\n" + G1, "s.yaml", "base"),
    W("sweep-base-inline-invalid", "name: s\nbase: {name: x}\n" + G1, "s.yaml", "model"),
    W("sweep-base-inline-typo", "name: s\nbase: {name: x, modle: tiny-random-llama, stages: [{type: evaluate}]}\n"
      + G1, "s.yaml", "unknown key `modle`"),
    W("sweep-base-folder", "name: s\nbase: sub\n" + G1, "sub", files={"sub/a.txt": "x"}),
    W("sweep-base-dev-zero", "name: s\nbase: /dev/zero\n" + G1, "/dev/zero"),
    W("sweep-base-fifo", "name: s\nbase: pipe.yaml\n" + G1, "pipe.yaml"),
    W("sweep-base-is-the-sweep", "name: s\nbase: s.yaml\n" + G1, "s.yaml"),
    W("sweep-base-invalid-recipe", "name: s\nbase: b.yaml\n" + G1, "b.yaml", "`threads`",
      files={"b.yaml": "name: b\nmodel: tiny-random-llama\nthreads: 100000000\nstages: [{type: evaluate}]\n"}),
    W("sweep-base-duplicate-key", "name: s\nbase: b.yaml\n" + G1, "b.yaml", "given twice",
      files={"b.yaml": stage("{type: quantize, method: rtn, bits: 2, bits: 8}")}),
    # grid
    W("sweep-grid-string", SW + "grid: seeds\n", "s.yaml", "grid"),
    W("sweep-grid-list", SW + "grid: [1, 2]\n", "s.yaml", "grid"),
    W("sweep-grid-values-mapping", SW + "grid: {seed: {a: 1}}\n", "s.yaml", "grid"),
    W("sweep-grid-unknown-target", SW + "grid: {stages.0.bitz: [4]}\n", "s.yaml", "bitz"),
    W("sweep-grid-all-out-of-range", SW + "grid: {threads: [0, 100000000]}\n", "s.yaml", "threads"),
    W("sweep-grid-fail-on-invalid", SW + "grid: {threads: [1, 0]}\non_invalid: fail\n", "s.yaml", "threads"),
    W("sweep-on-invalid-bad", SW + G1 + "on_invalid: maybe\n", "s.yaml", "on_invalid"),
    W("sweep-grid-300", SW + "grid: {seed: " + str(list(range(300))) + "}\n", "s.yaml", "300 runs",
      "max_runs: 256"),
    W("sweep-cap-lowered", SW + "grid: {seed: [1, 2, 3, 4]}\nmax_runs: 3\n", "s.yaml", "4 runs", "max_runs: 3"),
    W("sweep-cap-grid-plus-list", SW + "grid: {seed: " + str(list(range(256))) + "}\nlist: [{seed: 999}]\n",
      "s.yaml", "257 runs"),
    W("sweep-grid-100-million", SW + "grid: {" + ", ".join(f"k{i}: " + str(list(range(10))) for i in range(8))
      + "}\n", "s.yaml", "100,000,000 runs"),
    W("sweep-max-runs-huge", SW + G1 + "max_runs: 2000000\n", "s.yaml", "max_runs"),
    W("sweep-max-runs-text", SW + G1 + "max_runs: many\n", "s.yaml", "max_runs"),
    # list and set
    W("sweep-list-mapping", SW + "list: {seed: 1}\n", "s.yaml", "list"),
    W("sweep-list-entry-bad-key", SW + "list: [{'stages..bits': 4}]\n", "s.yaml", "list[0]",
      "not a dotted recipe key"),
    W("sweep-list-entry-name-path", SW + "list: [{name: ../../x, seed: 1}]\n", "s.yaml", "../../x"),
    W("sweep-list-same-names", SW + "list: [{name: a, seed: 1}, {name: a, seed: 2}]\n", "s.yaml", "`a`"),
    W("sweep-list-entry-unknown-key", SW + "list: [{stages.0.bitz: 4}]\n", "s.yaml", "list[0]", "bitz"),
    W("sweep-list-deep", SW + "list: [" + "[" * 100 + "]" * 100 + "]\n", "s.yaml", "nested more than 64"),
    W("sweep-set-unknown-key", SW + G1 + "set: {modle: x}\n", "s.yaml", "modle"),
    W("sweep-set-bad-value", SW + G1 + "set: {threads: 0}\n", "s.yaml", "threads"),
    W("sweep-set-name", SW + G1 + "set: {name: x}\n", "s.yaml", "naming"),
    W("sweep-set-internal-name", SW + G1 + "set_: {threads: 1}\n", "s.yaml", "unknown key `set_`"),
    # executor
    W("sweep-executor-number", SW + G1 + "executor: 5\n", "s.yaml", "executor"),
    W("sweep-executor-list", SW + G1 + "executor: [local]\n", "s.yaml", "executor"),
    W("sweep-executor-type-typo", SW + G1 + "executor: {type: rey}\n", "s.yaml", "executor"),
    W("sweep-executor-local-address", SW + G1 + "executor: {type: local, address: auto}\n", "s.yaml",
      "unknown key `address` in `executor`"),
    W("sweep-ray-cpus-0", RAY + "num_cpus: 0}\n", "s.yaml", "executor.num_cpus"),
    W("sweep-ray-gpus-negative", RAY + "num_gpus: -1}\n", "s.yaml", "executor.num_gpus"),
    W("sweep-ray-memory-0", RAY + "memory_gib: 0}\n", "s.yaml", "executor.memory_gib"),
    W("sweep-ray-concurrent-0", RAY + "max_concurrent: 0}\n", "s.yaml", "executor.max_concurrent"),
    W("sweep-ray-local-cpus-0", RAY + "local_cpus: 0}\n", "s.yaml", "executor.local_cpus"),
    W("sweep-ray-object-store-10", RAY + "object_store_mib: 10}\n", "s.yaml", "executor.object_store_mib"),
    W("sweep-ray-runtime-env-list", RAY + "runtime_env: [a]}\n", "s.yaml", "executor.runtime_env"),
    W("sweep-ray-retries-text", RAY + "retries: often}\n", "s.yaml", "executor.retries"),
    # recommend, naming, sorting
    W("sweep-recommend-not-list", SW + G1 + "recommend: smallest\n", "s.yaml", "recommend"),
    W("sweep-recommend-scalar-entry", SW + G1 + "recommend: [smallest]\n", "s.yaml", "recommend"),
    W("sweep-recommend-no-pick", SW + G1 + "recommend: [{max_kl: 1}]\n", "s.yaml", "pick"),
    W("sweep-recommend-top1-150", SW + G1 + "recommend: [{pick: fastest, min_top1_agreement: 150%}]\n", "s.yaml",
      "min_top1_agreement"),
    W("sweep-recommend-kl-negative", SW + G1 + "recommend: [{pick: fastest, max_kl: -1}]\n", "s.yaml", "max_kl"),
    W("sweep-recommend-size-0", SW + G1 + "recommend: [{pick: fastest, max_size_mib: 0}]\n", "s.yaml",
      "max_size_mib"),
    W("sweep-recommend-percent-nan", SW + G1 + "recommend: [{pick: smallest, min_quality_recovery: nan%}]\n",
      "s.yaml", "min_quality_recovery"),
    W("sweep-naming-unclosed", SW + "grid: {seed: [1, 2]}\nnaming: '{seed'\n", "s.yaml", "naming"),
    W("sweep-naming-attribute", SW + "grid: {seed: [1, 2]}\nnaming: '{seed.__class__}'\n", "s.yaml", "naming"),
    W("sweep-naming-number", SW + "grid: {seed: [1, 2]}\nnaming: 5\n", "s.yaml", "naming"),
    W("sweep-sort-by-number", SW + G1 + "sort_by: 5\n", "s.yaml", "sort_by"),
]
for _c in SWEEP_CASES:
    if _c.id == "sweep-base-fifo":
        _c.setup = fifo("pipe.yaml")
    if _c.id == "sweep-base-dev-zero":
        _c.proc = True

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

MANIFEST = '{"recipe": "r", "stages": [{"dir": "01-quantize", "type": "quantize"}]}'


def served(id, result: str, *expect, extra=None) -> Case:
    """``serve`` on a run folder whose one stage's result.json is ``result``."""
    files = {"run/manifest.json": MANIFEST, "run/01-quantize/result.json": result, **(extra or {})}
    case = X(id, ("serve", "{dir}/run", "--port", "0"), *expect, files=files)
    case.proc, case.absent = True, ("starting vLLM",)  # a subprocess: if a server starts anyway, it is killed
    return case


def serve_model(id, config: str | bytes, *expect) -> Case:
    """``serve`` on a model folder with this config.json (a subprocess: a server must never start)."""
    case = X(id, ("serve", "{dir}/m", "--port", "0"), *expect, files={"m/config.json": config})
    case.proc, case.absent = True, ("starting vLLM",)
    return case


CLI_CASES += [
    X("serve-manifest-stages-number", ("serve", "{dir}/run", "--port", "0"), "manifest.json",
      files={"run/manifest.json": '{"stages": 5}'}),
    X("serve-manifest-stages-of-numbers", ("serve", "{dir}/run", "--port", "0"), "{dir}/run",
      files={"run/manifest.json": '{"stages": [5, null]}'}),
    X("serve-manifest-not-utf8", ("serve", "{dir}/run", "--port", "0"), "manifest.json",
      files={"run/manifest.json": b'{"stages": ["\xe9"]}'}),
    X("serve-manifest-binary", ("serve", "{dir}/run", "--port", "0"), "manifest.json",
      files={"run/manifest.json": bytes(range(256))}),
    X("serve-manifest-folder", ("serve", "{dir}/run", "--port", "0"), "{dir}/run",
      files={"run/manifest.json/x": "x"}),
    X("serve-manifest-fifo", ("serve", "{dir}/run", "--port", "0"), "{dir}/run", files={"run/notes.txt": "x"}),
    served("serve-model-folder-gone", '{"result": {"model_dir": "model"}}', "01-quantize"),
    served("serve-model-dir-outside-the-run", '{"result": {"model_dir": "../../m"}}', "{dir}/run",
           extra={"m/config.json": '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}'}),
    served("serve-model-dir-number", '{"result": {"model_dir": 5}}', "{dir}/run"),
    served("serve-result-list", "[1, 2]", "{dir}/run"),
    served("serve-result-corrupt", "{bad", "{dir}/run"),
    serve_model("serve-model-config-list", "[1]", "config.json"),
    serve_model("serve-model-config-bad-length", '{"model_type": "llama", "max_position_embeddings": "abc"}',
                "config.json"),
    serve_model("serve-model-config-not-utf8", b'{"model_type": "ll\xe9ma"}', "config.json"),
    serve_model("serve-model-config-empty", "", "config.json"),
    X("serve-a-file", ("serve", "{dir}/notes.txt", "--port", "0"), "notes.txt", files={"notes.txt": "x"}),
    X("serve-builtin-typo", ("serve", "tiny-random-lama", "--port", "0"), "tiny-random-lama"),
    X("serve-empty-folder", ("serve", "{dir}/empty", "--port", "0"), "{dir}/empty", files={"empty/.keep": ""}),
    X("serve-threads-0", ("serve", "{dir}", "--threads", "0"), "--threads"),
    X("serve-threads-huge", ("serve", "{dir}", "--threads", "100000000"), "--threads"),
    X("serve-max-model-len-8", ("serve", "{dir}", "--max-model-len", "8"), "--max-model-len"),
    X("serve-kv-cache-0", ("serve", "{dir}", "--kv-cache-gib", "0"), "--kv-cache-gib"),
    X("serve-tp-0", ("serve", "{dir}", "--tp", "0"), "--tp"),
    X("serve-port-negative", ("serve", "{dir}", "--port", "-1"), "--port"),
    X("serve-port-text", ("serve", "{dir}", "--port", "http"), "--port"),
    X("serve-host-bad", ("serve", "{dir}/nothing", "--host", "999.999.1.1", "--port", "0"), "999.999.1.1"),
    X("validate-no-argument", ("validate",), "Missing argument"),
    X("validate-two-arguments", ("validate", "a.yaml", "b.yaml"), "unexpected extra argument"),
    X("run-set-without-value", ("run", "x.yaml", "--set"), "--set"),
    X("run-output-without-value", ("run", "x.yaml", "--output"), "--output"),
    X("sweep-no-argument", ("sweep", "--dry-run"), "Missing argument"),
    X("ls-extra-argument", ("ls", "models"), "unexpected extra argument"),
    X("setup-unknown-runtime", ("setup", "tgi"), "No such command"),
    X("setup-vllm-unknown-option", ("setup", "vllm", "--cuda"), "No such option"),
    X("app-port-text", ("app", "--port", "http"), "--port"),
    X("app-port-huge", ("app", "--port", "99999", "--no-default"), "--port"),
    X("app-max-models-0", ("app", "--max-models", "0", "--no-default"), "--max-models"),
    X("app-threads-0", ("app", "--threads", "0", "--no-default"), "--threads"),
    X("app-bad-device", ("app", "--device", "tpu"), "--device"),
    X("app-missing-recipe", ("app", "--recipe", "{dir}/nope.yaml", "--no-default", "--port", "0"), "nope.yaml"),
    C("app-bad-recipe", stage("{type: quantize, method: rtn, bits: 2, bits: 8}"), "{file}", "given twice",
      args=("app", "--recipe", "{file}", "--no-default", "--port", "0"), kind="cli"),
    C("app-port-env-text", None, "GRADIO_SERVER_PORT", args=("app", "--no-default"), kind="cli",
      env={"GRADIO_SERVER_PORT": "http"}),
    C("cache-is-a-file", stage("{type: evaluate, tasks: []}"), "{dir}/cache.txt",
      args=("run", "{file}", "--output", "{dir}/out", "-q"), kind="cli", env={"LLMCOMPRESS_CACHE": "{dir}/cache.txt"},
      files={"cache.txt": "mine"}),
    C("evals-path-missing", stage("{type: evaluate, tasks: [pydoc_ppl]}"), "{dir}/no-evals", kind="cli",
      env={"LLMCOMPRESS_EVALS": "{dir}/no-evals"}),
]
for _c in CLI_CASES:
    if _c.id == "serve-manifest-fifo":
        _c.setup = fifo("run/manifest.json")


# prune lowrank (issue 20): a target that removes everything or nothing, both or neither of target / rank_fraction
STAGE_CASES += [
    C("lowrank-allocation-with-rank-fraction", stage("{type: prune, method: lowrank, rank_fraction: 0.5, "
                                                     "allocation: params}"), "{file}", "Fix: remove `allocation`"),
    C("lowrank-allocation-unknown", stage("{type: prune, method: lowrank, target: 0.2, allocation: layers}"),
      "{file}", "allocation"),
    C("lowrank-target-1", stage("{type: prune, method: lowrank, target: 1}"), "{file}", "target", "removes nothing"),
    C("lowrank-target-0", stage("{type: prune, method: lowrank, target: 0}"), "{file}", "target", "e.g. target: 0.2"),
    C("lowrank-target-neg", stage("{type: prune, method: lowrank, target: -0.2}"), "{file}", "target"),
    C("lowrank-target-nan", stage("{type: prune, method: lowrank, target: .nan}"), "{file}", "target"),
    C("lowrank-rank-fraction-1", stage("{type: prune, method: lowrank, rank_fraction: 1.0}"), "{file}",
      "rank_fraction", "keeps everything"),
    C("lowrank-both", stage("{type: prune, method: lowrank, target: 0.2, rank_fraction: 0.5}"), "{file}",
      "exactly one of `target`", "both are set"),
    C("lowrank-neither", stage("{type: prune, method: lowrank}"), "{file}", "exactly one of `target`",
      "neither is set"),
    C("lowrank-damp-0", stage("{type: prune, method: lowrank, target: 0.2, damp: 0}"), "{file}", "damp"),
    C("lowrank-whitening-text", stage("{type: prune, method: lowrank, target: 0.2, whitening: maybe}"), "{file}",
      "whitening"),
    C("lowrank-sparsity-key", stage("{type: prune, method: lowrank, sparsity: 0.5}"), "{file}", "sparsity"),
    C("lowrank-calib-missing", stage("{type: prune, method: lowrank, target: 0.2, calibration: {source: x.txt}}"),
      "{file}", "x.txt"),
]

# quantize codebook (issue 20): bits outside 2..4, groups smaller than a codebook or not dividing the width, an unknown
# weighting, no iterations, a missing calibration file
STAGE_CASES += [
    C("codebook-bits-1", stage("{type: quantize, method: codebook, bits: 1}"), "{file}", "bits", "2, 3 or 4"),
    C("codebook-bits-9", stage("{type: quantize, method: codebook, bits: 9}"), "{file}", "bits", "got 9"),
    C("codebook-group-0", stage("{type: quantize, method: codebook, group_size: 0}"), "{file}", "group_size",
      "null"),
    C("codebook-group-neg", stage("{type: quantize, method: codebook, group_size: -1}"), "{file}", "group_size"),
    C("codebook-group-smaller-than-codebook", stage("{type: quantize, method: codebook, bits: 4, group_size: 8}"),
      "{file}", "group_size 8", "16 centroids", "Fix"),
    C("codebook-weighting-unknown", stage("{type: quantize, method: codebook, weighting: hessian}"), "{file}",
      "weighting", "fisher"),
    C("codebook-iterations-0", stage("{type: quantize, method: codebook, iterations: 0}"), "{file}", "iterations"),
    C("codebook-centroids-key", stage("{type: quantize, method: codebook, centroids: 16}"), "{file}", "centroids"),
    C("codebook-calib-missing", stage("{type: quantize, method: codebook, calibration: {source: x.txt}}"), "{file}",
      "x.txt"),
    C("codebook-group-not-dividing-run", stage("{type: quantize, method: codebook, weighting: none, group_size: 48}"),
      "group_size 48 does not divide the input width 64", "Fix", args=("run", "{file}", "--output", "{dir}/out", "-q"),
      kind="cli"),
]

# distill (issue 20)
STAGE_CASES += [
    C("distill-teacher-unknown", stage("{type: distill, teacher: nope}"), "{file}", "stages[0] (distill)",
      "`teacher: nope` names no earlier stage", "Fix: `teacher: original`"),
    C("distill-teacher-later", head("  - {type: distill, teacher: later}\n"
                                    "  - {type: prune, method: magnitude, sparsity: 0.5, name: later}\n"),
      "{file}", "stages[0] (distill)", "names no earlier stage"),
    C("distill-teacher-writes-no-model", head("  - {type: evaluate, tasks: [], name: ev}\n"
                                              "  - {type: distill, teacher: ev}\n"),
      "{file}", "stages[1] (distill)", "writes no model"),
    C("distill-data-empty-file", stage("{type: distill, data: {source: empty.txt}}"), "{file}", "is empty",
      files={"empty.txt": ""}),
    C("distill-samples-zero", stage("{type: distill, data: {samples: 0}}"), "{file}", "samples"),
    C("distill-budget-zero", stage("{type: distill, budget: {minutes: 0}}"), "{file}", "`budget.minutes` must be > 0"),
    C("distill-two-budgets", stage("{type: distill, budget: {minutes: 5, steps: 300}}"), "{file}", "exactly one"),
    C("distill-no-budget", stage("{type: distill, budget: {}}"), "{file}", "exactly one"),
    C("distill-top-k-zero", stage("{type: distill, top_k: 0}"), "{file}", "`top_k` must be between 1 and"),
    C("distill-top-k-huge", stage("{type: distill, top_k: 100000}"), "{file}", "`top_k` must be between 1 and"),
    C("distill-hidden-weight-negative", stage("{type: distill, hidden_weight: -0.5}"), "{file}",
      "`hidden_weight` must be >= 0"),
    C("distill-held-out-every-zero", stage("{type: distill, held_out: {every: 0}}"), "{file}", "every"),
    C("distill-held-out-missing-file", stage("{type: distill, held_out: {source: nope.txt}}"), "{file}", "nope.txt"),
    C("distill-lora-key-with-train-all", stage("{type: distill, r: 8}"), "{file}", "`r` applies to `train: lora`"),
    C("distill-data-list-empty", stage("{type: distill, data: []}"), "{file}", "`data` is an empty list"),
    C("distill-data-list-seq-len", stage("{type: distill, data: [{source: builtin:pydoc, seq_len: 128}, "
                                         "{source: builtin:pysource, seq_len: 256}]}"), "{file}",
      "different seq_len (128, 256)", "Fix: give every source the same `seq_len`"),
    C("distill-data-list-missing-file", stage("{type: distill, data: [{source: builtin:pysource}, "
                                              "{source: nope.txt}]}"), "{file}", "nope.txt"),
    C("prune-calibration-list-seq-len", stage("{type: prune, method: width, target: 0.2, calibration: ["
                                              "{source: builtin:pydoc, seq_len: 128}, {source: builtin:pysource, "
                                              "seq_len: 256}]}"), "{file}", "`calibration` lists sources with "
      "different seq_len (128, 256)", "Fix: give every source the same `seq_len`"),
    C("prune-calibration-list-missing-file", stage("{type: prune, method: depth, layers: 2, calibration: ["
                                                   "{source: builtin:pysource}, {source: nope.txt}]}"), "{file}",
      "nope.txt"),
    C("distill-on-vision", "name: r\nmodel: tiny-random-convnext\nthreads: 1\nstages:\n  - {type: distill}\n",
      "{file}", "stages[0] (distill)", "Fix: remove it"),
]

# vision conv pruning (issue 20): structured on the builtin digits ResNet / MobileNet, refused at validation
STAGE_CASES += [
    C("conv-structured-sparsity-0", stage("{type: prune, method: structured, sparsity: 0}").replace(
        "tiny-random-llama", "digits-resnet"), "{file}", "sparsity", "strictly between 0 and 1"),
    C("conv-structured-sparsity-1", stage("{type: prune, method: structured, sparsity: 1}").replace(
        "tiny-random-llama", "digits-mobilenet"), "{file}", "sparsity", "strictly between 0 and 1"),
    C("conv-structured-multiple-negative", stage(
        "{type: prune, method: structured, sparsity: 0.3, multiple_of: -8}").replace(
        "tiny-random-llama", "digits-resnet"), "{file}", "multiple_of"),
    C("conv-structured-pattern", stage("{type: prune, method: structured, pattern: '2:4'}").replace(
        "tiny-random-llama", "digits-resnet"), "{file}", "`pattern` is N:M sparsity within rows"),
    C("conv-structured-then-bnb", head("  - {type: prune, method: structured, sparsity: 0.3}\n"
                                       "  - {type: quantize, method: bnb-nf4}\n").replace(
        "tiny-random-llama", "digits-resnet"), "{file}", "stages[1]", "Fix: use rtn, hqq or dynamic-int8"),
]


STAGE_CASES += [
    # structural pruning (width, depth): checked against the model's config.json before any weights load
    C("width-target-0", stage("{type: prune, method: width, target: 0}"), "{file}", "target", "between 0 and 1"),
    C("width-target-1", stage("{type: prune, method: width, target: 1}"), "{file}", "target", "between 0 and 1"),
    C("width-no-size", stage("{type: prune, method: width}"), "{file}", "say how much to remove"),
    C("width-heads-over-groups", stage("{type: prune, method: width, heads: 3}"), "{file}", "stages[0]",
      "at most 2 heads"),
    C("width-kv-heads-more", stage("{type: prune, method: width, kv_heads: 2}"), "{file}", "more than the model's 1"),
    C("width-own-size", stage("{type: prune, method: width, intermediate_size: 128}"), "{file}",
      "nothing would be removed"),
    C("width-removes-everything", stage("{type: prune, method: width, target: 0.95}"), "{file}",
      "the rest of the model alone holds"),
    C("width-target-and-size", stage("{type: prune, method: width, target: 0.2, intermediate_size: 64}"), "{file}",
      "`target` sets `intermediate_size`"),
    C("depth-too-deep", stage("{type: prune, method: depth, layers: 2}"), "{file}", "every decoder layer"),
    C("depth-target-everything", stage("{type: prune, method: depth, target: 0.99}"), "{file}", "every decoder layer"),
    C("depth-both", stage("{type: prune, method: depth, layers: 1, target: 0.2}"), "{file}", "exactly one"),
]

ALL = FILE_CASES + TOP_CASES + STAGE_CASES + SET_CASES + OUTPUT_CASES + SWEEP_CASES + CLI_CASES
GROUPS = {"file": FILE_CASES, "top": TOP_CASES, "stage": STAGE_CASES, "set": SET_CASES, "output": OUTPUT_CASES,
          "sweep": SWEEP_CASES, "cli": CLI_CASES}


def materialize(case: Case, tmp_path: Path) -> tuple[list[str], dict[str, str], Callable[[], object] | None]:
    recipe = tmp_path / "r.yaml"
    if case.text is not None:
        (recipe.write_bytes if isinstance(case.text, bytes) else recipe.write_text)(case.text)
    for name, content in case.files.items():
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    cleanup = case.setup(tmp_path) if case.setup else None
    fill = {"file": str(recipe), "dir": str(tmp_path)}
    return [_fill(a, fill) for a in case.args], fill, cleanup


def _fill(text: str, fill: dict[str, str]) -> str:
    """``{file}`` and ``{dir}`` filled in; other braces (YAML flow mappings) left alone."""
    for k, v in fill.items():
        text = text.replace("{" + k + "}", v)
    return text


def snapshot(root: Path) -> dict[str, str]:
    """Every file, link and folder under ``root`` (links not followed) with a digest of its content."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else "special"
    return out


def inputs_text(case: Case) -> str:
    parts = [case.text, *case.files.values(), *case.args]
    return " ".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts if p is not None)


def check(output: str, code: int, case: Case, fill: dict[str, str]) -> None:
    assert code == 2, f"{case.id}: exit {code}, expected 2:\n{output[-3000:]}"
    assert not CRASH.search(output), f"{case.id}: a traceback or a bare exception:\n{output[-3000:]}"
    assert not PYDANTIC.search(output), f"{case.id}: pydantic's raw error instead of a message:\n{output[-3000:]}"
    typed = inputs_text(case)
    for name in INTERNAL:
        assert name not in output or name in typed, f"{case.id}: an internal field name `{name}`:\n{output[-3000:]}"
    flat = " ".join(output.split())  # rich wraps long lines
    for fragment in case.expect:
        want = " ".join(_fill(fragment, fill).split())
        assert want in flat, f"{case.id}: the message lacks {want!r}:\n{output[-3000:]}"
    for fragment in case.absent:
        assert fragment not in flat, f"{case.id}: {fragment!r} should not happen:\n{output[-3000:]}"


def check_kept(before: dict[str, str], tmp_path: Path, case: Case) -> None:
    """Nothing that was there before the command is gone or changed (``--fresh`` deletes only what a run wrote)."""
    after = snapshot(tmp_path)
    lost = [k for k, v in before.items() if after.get(k) != v]
    assert not lost, f"{case.id}: deleted or changed files that were there before: {lost[:10]}"


class Hung(BaseException):
    """Raised by the alarm in the middle of a command that did not answer in time (BaseException: CliRunner
    catches Exception and would report it as the command's own)."""


@contextmanager
def deadline(seconds: float, what: str):
    def ring(signum, frame):
        raise Hung(f"{what}: no answer after {seconds:.0f} s (a hang; a bad input must be refused at once)")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))  # a read of /dev/zero fails instead of the box


def run_real(args: list[str], cwd: Path, env: dict[str, str], what: str) -> tuple[str, int]:
    """``python -m llmcompress.cli ARGS`` in its own process group, killed whole on a hang; (output, exit code)."""
    # This checkout's package, whatever an editable install elsewhere points at.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **env}
    p = subprocess.Popen([sys.executable, "-m", "llmcompress.cli", *args], cwd=cwd, env=full, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=_limit_memory)
    try:
        out, err = p.communicate(timeout=PROC_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{what}: no answer after {PROC_TIMEOUT} s (a hang):\n{(out + err)[-3000:]}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # a server or worker it left behind
        except ProcessLookupError:
            pass
    return out + err, p.returncode


def test_the_corpus_is_large_and_covers_every_kind():
    kinds = {c.kind for c in ALL}
    assert len(ALL) >= 150 and kinds == {"recipe", "set", "output", "sweep", "cli"}
    assert len({c.id for c in ALL}) == len(ALL)  # ids are unique
    assert all(len(group) >= 20 for group in GROUPS.values()), {k: len(v) for k, v in GROUPS.items()}


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_exits_2_with_a_message_that_names_the_place(case, tmp_path, monkeypatch):
    run_case(case, tmp_path, monkeypatch)


def run_case(case: Case, tmp_path: Path, monkeypatch) -> None:
    """Run one case (in this process, or the real entry point for ``proc`` cases) and check the contract: exit 2,
    the message, nothing else touched, quickly, nothing ran. Shared by the other bad-input corpora."""
    from llmcompress.cli import app

    monkeypatch.chdir(tmp_path)  # a run that slipped through would write runs/ here, not in the repository
    args, fill, cleanup = materialize(case, tmp_path)
    env = {k: _fill(v, fill) for k, v in case.env.items()}
    before = snapshot(tmp_path)
    sigterm, sigint = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        t0 = time.perf_counter()
        if case.proc:
            output, code = run_real(args, tmp_path, env, case.id)
        else:
            with deadline(TIMEOUT, case.id):
                result = CliRunner().invoke(app, args, env=env)
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                import traceback

                tb = "".join(traceback.format_exception(result.exception))
                pytest.fail(f"{case.id}: uncaught {type(result.exception).__name__}:\n{tb[-3000:]}")
            output, code = result.output, result.exit_code
        took = time.perf_counter() - t0
    except Hung as e:
        pytest.fail(str(e))
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # `app` and `serve` install their own handlers
        signal.signal(signal.SIGINT, sigint)
        if cleanup:
            cleanup()
    check(output, code, case, fill)
    check_kept(before, tmp_path, case)
    assert took < TIMEOUT, f"{case.id}: refused only after {took:.0f} s"
    assert not (tmp_path / "runs").exists() or case.kind == "output", f"{case.id}: something ran"


#: A sample through the real entry point (``main()``: SIGTERM handler, the last-resort error handler).
REAL = ["non-utf8", "deep-nesting-flow", "alias-bomb-top", "duplicate-stage-key", "threads-huge", "gguf-not-gguf",
        "lora-data-missing-file", "lora-data-typo", "set-unclosed-list", "output-under-file", "sweep-list-bomb",
        "sweep-grid-huge", "serve-corrupt-manifest", "dev-zero", "cache-under-a-file", "output-name-too-long",
        "fifo-recipe", "fresh-working-directory", "fresh-home-folder", "int-over-4300-digits", "set-lone-surrogate",
        "sweep-grid-100-million", "app-max-models-0"]


@pytest.mark.parametrize("case_id", REAL)
def test_the_real_entry_point_agrees(case_id, tmp_path):
    case = next(c for c in ALL if c.id == case_id)
    assert not case.proc  # those run this way already
    args, fill, cleanup = materialize(case, tmp_path)
    before = snapshot(tmp_path)
    try:
        output, code = run_real(args, tmp_path, {k: _fill(v, fill) for k, v in case.env.items()}, case.id)
    finally:
        if cleanup:
            cleanup()
    check(output, code, case, fill)
    check_kept(before, tmp_path, case)
