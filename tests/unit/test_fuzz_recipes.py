"""A property-based fuzzer over the shipped recipes and sweep: hypothesis mutates valid files (keys dropped, misspelt
or duplicated, values of another type or out of range, stages duplicated or reordered, garbage characters or bytes
in the text, odd YAML values written in place) and ``--set`` items, and ``llmcompress validate`` (``sweep
--dry-run``) must answer exit 0 (still valid) or exit 2 with a message that names the file or the ``--set`` item,
never a traceback, another exit code or a hang. Derandomized: CI sees the same examples every time.

The recipes are copied to a temporary folder first (relative paths inside ``recipes/`` keep working; nothing is
written into the repository)."""

from __future__ import annotations

import re
import shutil
import time
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from test_bad_inputs import Hung, deadline  # the same alarm: a hang fails the example

ROOT = Path(__file__).resolve().parents[2]
#: Valid recipes that validate offline (the CUDA-only fp8 one aside), by file name.
NAMES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml") if "fp8" not in p.name)
RECIPES = {name: (ROOT / "recipes" / name).read_text() for name in NAMES}
SWEEP = "sweeps/smollm2-methods.yaml"
CRASH = re.compile(r"Traceback|^\w+(Error|Exception):|\b(RecursionError|UnicodeDecodeError|UnicodeEncodeError|"
                   r"MemoryError|KeyError|AttributeError|IndexError|OverflowError)\b", re.MULTILINE)
PYDANTIC = re.compile(r"errors\.pydantic\.dev|validation errors? for \w+|input_value=|\[type=\w+")
#: Seconds one example may take before it counts as a hang.
LIMIT = 20
#: No shrinking: a failing example is printed as found, and a hang cannot make CI wait through a shrink.
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                 max_size=2),
    st.sampled_from(["builtin:nope", "../../etc/passwd", "hf:x", "", "-1", "1e309", "[1", "{a: }", "*x", "&y z",
                     "/dev/zero", "missing.jsonl", "data", "a" * 300]),
)
#: YAML value texts written in place of a value (what yaml.safe_dump would never write).
ODD_TEXT = st.sampled_from([
    "9" * 5000, "-" + "9" * 5000, ".inf", "-.inf", ".nan", "0x7fffffffffffffff", "0o777", "1_000_000", "2001-12-14",
    "~", "[", "{", "]", "&a [*a]", "*nothing", "!!binary AAAA", "!!python/name:os.system", "!!set {a}", "yes", "'",
    '"\\x00"', "|\n  text", "[" * 80 + "]" * 80, "{a: 1, a: 2}", "- x", "\t4", "1e9999", "@x", "`x`",
])
GARBAGE = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8) | st.sampled_from(
    ["\t", "\x00", "- ", ": ", "[", "{", "&a", "*a", "!!python/name:os.system", "\n  bits: 9\n", "\ufeff", "\r",
     "\x1b[31m", "\u2028", "#", "%YAML 1.1\n---\n", "\n---\n", "<<: *a\n"])


def paths(node, prefix=()):
    """Every (path, value) in a parsed recipe, parents before children."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def _parent(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    return doc


@st.composite
def mutated_text(draw, text: str) -> str | bytes:
    """One mutation of a valid recipe or sweep: the text (str) or, for byte-level damage, bytes."""
    doc = yaml.safe_load(text)
    kind = draw(st.sampled_from(["drop", "typo", "value", "wrap", "dup-stage", "reorder", "text", "dup-key",
                                 "value-text", "bytes"]))
    spots = [p for p, _ in paths(doc) if p]
    if kind in ("drop", "typo", "value", "wrap") and spots:
        path = draw(st.sampled_from(spots))
        parent = _parent(doc, path)
        if kind == "drop":
            del parent[path[-1]]
        elif kind == "typo" and isinstance(path[-1], str):
            key = path[-1]
            i = draw(st.integers(0, len(key) - 1))
            parent[key[:i] + draw(st.sampled_from("xz_")) + key[i + 1:]] = parent.pop(key)
        elif kind == "wrap":
            parent[path[-1]] = draw(st.sampled_from([[parent[path[-1]]], {"value": parent[path[-1]]}]))
        else:
            parent[path[-1]] = draw(ODD_VALUES)
        return yaml.safe_dump(doc, sort_keys=False)
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if kind == "dup-stage" and stages:
        stages.append(draw(st.sampled_from(stages)))
        return yaml.safe_dump(doc, sort_keys=False)
    if kind == "reorder" and stages:
        doc["stages"] = draw(st.permutations(stages))
        return yaml.safe_dump(doc, sort_keys=False)
    keyed = [ln for ln in text.splitlines() if re.match(r"^\s*(- )?\{?[\w.]+:", ln)]
    if kind == "dup-key" and keyed:
        line = draw(st.sampled_from(keyed))
        return text.replace(line, line + "\n" + line, 1)
    valued = [ln for ln in text.splitlines() if re.match(r"^\s*[\w.]+: [^#{\[\s]", ln)]
    if kind == "value-text" and valued:
        line = draw(st.sampled_from(valued))
        key = line.split(":", 1)[0]
        return text.replace(line, f"{key}: {draw(ODD_TEXT)}", 1)
    at = draw(st.integers(0, len(text)))
    if kind == "bytes":  # invalid UTF-8, NULs, a truncated multi-byte sequence
        data = text.encode()
        junk = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\x00"]))
        return data[:at] + junk + data[at:]
    return text[:at] + draw(GARBAGE) + text[at:]


@pytest.fixture(scope="module")
def recipes_dir(tmp_path_factory) -> Path:
    """A copy of recipes/ (data files and the sweep's relative base included)."""
    folder = tmp_path_factory.mktemp("fuzz") / "recipes"
    shutil.copytree(ROOT / "recipes", folder)
    _build_builtin_models()
    return folder


def _build_builtin_models() -> None:
    """Build the builtin models the recipes name before the timed examples: validate reads a builtin's config.json,
    and the first use of one on a fresh machine builds it (digits-convnext trains for ~2 minutes), which the
    20-second hang limit must not count."""
    from llmcompress.models import resolve_source
    from llmcompress.models.source import materialize
    from llmcompress.recipe import load_recipe

    for name in NAMES:
        source = resolve_source(load_recipe(ROOT / "recipes" / name).model, ROOT / "recipes")
        if source.kind == "builtin":
            materialize(source)


def invoke(args: list[str], shown: str, allowed=(0, 2)) -> str:
    """Run the CLI in this process; fail on a crash, a hang, a pydantic dump or an exit code outside ``allowed``."""
    from llmcompress.cli import app

    t0 = time.perf_counter()
    try:
        with deadline(LIMIT, shown):
            result = CliRunner().invoke(app, args)
    except Hung as e:
        pytest.fail(f"{e}\n--- input ---\n{shown}")
    took = time.perf_counter() - t0
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"crashed:\n--- input ---\n{shown}\n--- traceback ---\n{tb[-3000:]}")
    out = result.output
    assert result.exit_code in allowed, f"exit {result.exit_code}\n--- input ---\n{shown}\n{out[-2000:]}"
    assert not CRASH.search(out), f"a traceback or bare exception:\n--- input ---\n{shown}\n{out[-2000:]}"
    assert not PYDANTIC.search(out), f"pydantic's raw error:\n--- input ---\n{shown}\n{out[-2000:]}"
    for internal in ("list_", "set_"):
        assert internal not in out or internal in shown, f"an internal field name `{internal}`:\n{out[-2000:]}"
    assert took < LIMIT, f"took {took:.0f} s\n--- input ---\n{shown}"
    return out if result.exit_code == 2 else ""


def write(folder: Path, name: str, content: str | bytes) -> Path:
    f = folder / f".fuzz-{name}"
    (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    return f


def shown(content: str | bytes) -> str:
    """The input as a failure message shows it: long runs of one character abbreviated."""
    text = content if isinstance(content, str) else repr(content)
    return re.sub(r"(.)\1{79,}", lambda m: f"{m.group(1) * 8}...({len(m.group(0))} x {m.group(1)!r})", text)[:4000]


@st.composite
def mutated_recipe(draw):
    name = draw(st.sampled_from(NAMES))
    return name, draw(mutated_text(RECIPES[name]))


@settings(max_examples=500, **SETTINGS)
@given(case=mutated_recipe())
def test_a_mutated_recipe_validates_or_exits_2_with_a_message(case, recipes_dir):
    name, content = case
    f = write(recipes_dir, name, content)  # beside the original: its relative paths resolve as they do there
    try:
        message = invoke(["validate", str(f)], f"{name} mutated:\n{shown(content)}")
    finally:
        f.unlink()
    if message:
        assert str(f) in " ".join(message.split()), f"the message does not name the file:\n{message}"


#: --set keys: real places in tiny-smoke.yaml, typos of them, indexes out of range and plain junk.
SET_KEYS = st.sampled_from([
    "name", "model", "dtype", "device", "seed", "threads", "stages", "stages.0", "stages.0.bits", "stages.0.method",
    "stages.0.group_size", "stages.0.skip", "stages.0.type", "stages.1.limit", "stages.1.tasks", "stages.1.perplexity",
    "stages.1.perplexity.ctx_len", "stages.2.batch_sizes", "stages.2.vllm.max_model_len", "stages.2.compare",
    "stages.3", "stages.-1.bits", "stages.99.bits", "stages.x", "stages..bits", "model.source", "model.kind",
    "name.x", "threads.0", "stages.0.bits.x", "stages.1.perplexity.corpus", "stages.0.calibration.samples", "",
    " ", "\t", "a.b.c", "stages.0.bitz", "stagse.0.bits",
]) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-\t ", max_size=20)
SET_VALUES = ODD_TEXT | st.text(max_size=30) | st.sampled_from(["4", "0", "-4", "2", "8", "[pydoc_ppl]", "[]", "{}",
                                                                 "rtn", "hqq", "gptq", "tiny-random-llama", "float32",
                                                                 "null", "{type: evaluate}", "{type: nope}"])


@settings(max_examples=300, **SETTINGS)
@given(items=st.lists(st.tuples(SET_KEYS, SET_VALUES), min_size=1, max_size=3), eq=st.sampled_from(["=", "==", ""]))
def test_set_overrides_validate_or_exit_2_with_a_message(items, eq, recipes_dir):
    sets = [f"{k}{eq if i == 0 else '='}{v}" for i, (k, v) in enumerate(items)]
    args = ["validate", str(recipes_dir / "tiny-smoke.yaml")]
    for item in sets:
        args += ["--set", item]
    message = invoke(args, "tiny-smoke.yaml " + shown(" ".join(f"--set {s!r}" for s in sets)))
    if message:
        flat = " ".join(message.split())
        assert "--set" in flat or "tiny-smoke.yaml" in flat, f"the message names no place:\n{message}"


@settings(max_examples=100, **SETTINGS)
@given(content=mutated_text((ROOT / "recipes" / SWEEP).read_text()))
def test_a_mutated_sweep_dry_runs_or_exits_2_with_a_message(content, recipes_dir, tmp_path_factory):
    f = write(recipes_dir / "sweeps", "sweep.yaml", content)
    out = tmp_path_factory.mktemp("sweep-out")
    try:
        args = ["sweep", str(f), "--dry-run", "--output", str(out / "s")]
        message = invoke(args, f"sweep mutated:\n{shown(content)}")
    finally:
        f.unlink()
    if message:
        flat = " ".join(message.split())
        assert str(f) in flat or str(f.parent.parent) in flat, f"the message does not name the file:\n{message}"
