"""A property-based fuzzer over the shipped recipes: hypothesis mutates valid recipes (keys dropped, misspelt or
duplicated, values of another type or out of range, stages duplicated or reordered, garbage characters in the text)
and ``llmcompress validate`` must answer exit 0 (still valid) or exit 2 with a message, never a traceback, another
exit code or a hang. Derandomized: CI sees the same examples every time."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
#: Valid recipes that validate offline (GPU-only ones aside), as text.
RECIPES = {p.name: p.read_text() for p in sorted((ROOT / "recipes").glob("*.yaml")) if "fp8" not in p.name}
CRASH = re.compile(r"Traceback|^\w+(Error|Exception):", re.MULTILINE)

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                 max_size=2),
    st.sampled_from(["builtin:nope", "../../etc/passwd", "hf:x", "", "-1", "1e309", "[1", "{a: }", "*x", "&y z"]),
)


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
def mutated(draw):
    name = draw(st.sampled_from(sorted(RECIPES)))
    text = RECIPES[name]
    doc = yaml.safe_load(text)
    kind = draw(st.sampled_from(["drop", "typo", "value", "dup-stage", "reorder", "text", "dup-key"]))
    spots = [p for p, _ in paths(doc) if p]
    if kind in ("drop", "typo", "value") and spots:
        path = draw(st.sampled_from(spots))
        parent = _parent(doc, path)
        if kind == "drop":
            del parent[path[-1]]
        elif kind == "typo" and isinstance(path[-1], str):
            key = path[-1]
            i = draw(st.integers(0, len(key) - 1))
            parent[key[:i] + draw(st.sampled_from("xz_")) + key[i + 1:]] = parent.pop(key)
        else:
            parent[path[-1]] = draw(ODD_VALUES)
        return name, yaml.safe_dump(doc, sort_keys=False)
    if kind == "dup-stage" and doc.get("stages"):
        doc["stages"].append(draw(st.sampled_from(doc["stages"])))
        return name, yaml.safe_dump(doc, sort_keys=False)
    if kind == "reorder" and doc.get("stages"):
        doc["stages"] = draw(st.permutations(doc["stages"]))
        return name, yaml.safe_dump(doc, sort_keys=False)
    if kind == "dup-key":
        line = draw(st.sampled_from([ln for ln in text.splitlines() if re.match(r"^\s*\w+:", ln)]))
        return name, text.replace(line, line + "\n" + line, 1)
    # Garbage characters somewhere in the text.
    at = draw(st.integers(0, len(text)))
    junk = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8) |
                st.sampled_from(["\t", "\x00", "- ", ": ", "[", "{", "&a", "*a", "!!python/name:os.system",
                                 "\n  bits: 9\n"]))
    return name, text[:at] + junk + text[at:]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_a_mutated_recipe_validates_or_exits_2_with_a_message(case, tmp_path_factory):
    from llmcompress.cli import app

    name, text = case
    folder = tmp_path_factory.mktemp("fuzz")
    # Relative paths in the shipped recipes (data files, compare entries) resolve as they do in recipes/.
    f = ROOT / "recipes" / f".fuzz-{folder.name}.yaml"
    f.write_text(text)
    try:
        t0 = time.perf_counter()
        result = CliRunner().invoke(app, ["validate", str(f)])
        took = time.perf_counter() - t0
    finally:
        f.unlink()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"mutation of {name} crashed validate:\n--- recipe ---\n{text}\n--- traceback ---\n{tb[-3000:]}")
    assert result.exit_code in (0, 2), f"{name}: exit {result.exit_code}\n{text}\n{result.output[-2000:]}"
    assert not CRASH.search(result.output), f"{name}:\n{text}\n{result.output[-2000:]}"
    if result.exit_code == 2:
        assert str(f) in " ".join(result.output.split()) or "--set" in result.output, result.output
    assert took < 30, f"{name}: validate took {took:.0f} s"
