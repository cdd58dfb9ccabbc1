"""Recipe schema: validation, overrides and the error messages a user sees."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmcompress.errors import RecipeError
from llmcompress.recipe import apply_override, load_recipe

BASE = {"name": "t", "model": "tiny-random-llama", "stages": [{"type": "quantize", "method": "rtn", "bits": 4}]}


def recipe(**changes):
    import copy

    return copy.deepcopy({**BASE, **changes})


def error_of(raw, overrides=None) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(raw, overrides)
    return str(e.value)


def test_valid_recipe_fills_defaults_and_is_frozen():
    r = load_recipe(recipe())
    assert r.model.source == "tiny-random-llama"
    assert r.dtype == "auto" and r.seed == 0
    q = r.stages[0]
    assert (q.method, q.bits, q.group_size, q.skip) == ("rtn", 4, 64, ["lm_head"])
    with pytest.raises(ValidationError):
        q.bits = 8  # configs are never mutated after validation


def test_model_shorthand_and_object_form():
    r = load_recipe(recipe(model={"source": "org/name", "revision": "main"}))
    assert r.model.revision == "main"


def test_unknown_top_level_key_has_did_you_mean():
    msg = error_of(recipe(stagse=[]))
    assert "unknown key `stagse`" in msg and "Did you mean `stages`?" in msg


def test_unknown_stage_key_names_stage_and_suggests():
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "rtn", "bitz": 4}]))
    assert msg.startswith("recipe: stages[0] (quantize): unknown key `bitz`.")
    assert "Did you mean `bits`?" in msg


def test_unknown_method_and_stage_type_did_you_mean():
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "bnb-nf5"}]))
    assert "unknown method `bnb-nf5`" in msg and "Did you mean `bnb-nf4`?" in msg and "rtn" in msg
    msg = error_of(recipe(stages=[{"type": "quantise", "method": "rtn"}]))
    assert "unknown stage type `quantise`" in msg and "Did you mean `quantize`?" in msg


def test_wrong_type_and_range_name_field_and_value():
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "rtn", "bits": "four"}]))
    assert "stages[0] (quantize): `bits`" in msg and "'four'" in msg
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "rtn", "bits": 12}]))
    assert "`bits`: must be between 2 and 8, got 12" in msg


def test_missing_fields_and_empty_stages():
    assert "`name` is required" in error_of({"model": "x", "stages": [{"type": "evaluate"}]})
    assert "stages" in error_of(recipe(stages=[]))
    assert "has no `type:`" in error_of(recipe(stages=[{"method": "rtn"}]))


def test_two_quantize_stages_rejected():
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "rtn"}, {"type": "quantize", "method": "bnb-nf4"}]))
    assert "stages[1] (quantize) would quantize a model that stages[0] already quantized" in msg


def test_bad_regex_in_skip():
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "rtn", "skip": ["lm_head(" ]}]))
    assert "`skip`" in msg and "not a valid regex" in msg


def test_overrides_are_type_checked():
    r = load_recipe(recipe(), ["stages.0.bits=8", "seed=3", "stages.0.skip=[lm_head, embed]"])
    assert r.stages[0].bits == 8 and r.seed == 3 and r.stages[0].skip == ["lm_head", "embed"]
    assert "`bits`" in error_of(recipe(), ["stages.0.bits=eight"])
    assert "not an index" in error_of(recipe(), ["stages.5.bits=4"])
    assert "expected KEY=VALUE" in error_of(recipe(), ["stages.0.bits"])


def test_override_can_switch_method():
    raw = recipe()
    apply_override(raw, "stages.0.method=bnb-nf4")
    apply_override(raw, "stages.0.bits=")  # null removes nothing but must then fail validation clearly
    assert "`bits`" in error_of(raw)


def test_file_errors(tmp_path):
    assert "no such recipe file" in error_of(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n  - type: quantize\n")
    msg = error_of(bad)
    assert msg.startswith(f"{bad}:") and "not valid YAML" in msg and "line" in msg
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    assert "a recipe is a mapping" in error_of(lst)


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: r\nmodel: tiny-random-llama\nstages:\n  - type: quantize\n    method: rtn\n    group_size: 0\n")
    msg = error_of(f)
    assert msg.startswith(f"{f}: stages[0] (quantize): `group_size`")


def test_recipe_dir_is_base_for_paths(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: r\nmodel: tiny-random-llama\nstages: [{type: evaluate}]\n")
    r = load_recipe(f)
    assert r.resolve_path("data/x.txt") == tmp_path / "data" / "x.txt"
    assert "model:" in r.to_yaml() and "stages:" in r.to_yaml()


def test_auto_dtype_resolves_to_what_the_hardware_runs_fast(monkeypatch):
    from llmcompress import context
    from llmcompress.context import Runtime, auto_dtype

    assert auto_dtype("cuda") == "bfloat16"
    monkeypatch.setattr(context, "cpu_has_native_bf16", lambda: False)
    assert auto_dtype("cpu") == "float32"
    assert Runtime.from_recipe(load_recipe(recipe(device="cpu"))).dtype == "float32"
    assert Runtime.from_recipe(load_recipe(recipe(device="cpu", dtype="bfloat16"))).dtype == "bfloat16"
    monkeypatch.setattr(context, "cpu_has_native_bf16", lambda: True)
    assert auto_dtype("cpu") == "bfloat16"


def test_prune_after_quantize_rejected():
    msg = error_of(recipe(stages=[{"type": "quantize", "method": "rtn"},
                                  {"type": "prune", "method": "magnitude", "sparsity": 0.5}]))
    assert "stages[1] (prune) comes after stages[0] (quantize)" in msg and "Fix:" in msg
