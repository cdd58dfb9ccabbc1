"""Vision recipes when they load: the model kind is found without weights, and settings that do not fit the kind
(LLM-only on a vision model, vision-only on an LLM) stop the recipe with the place and the fix."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from llmcompress.errors import RecipeError
from llmcompress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def _recipe(model, *stages, **kw):
    return {"name": "v", "model": model, "stages": list(stages) or [{"type": "evaluate"}], **kw}


def _folder(tmp_path: Path, name: str, config: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config,expected", [
    ({"architectures": ["ViTForImageClassification"]}, ("vision", "image-classification")),
    ({"architectures": ["ConvNextForImageClassification"]}, ("vision", "image-classification")),
    ({"architectures": ["DetrForObjectDetection"]}, ("vision", "object-detection")),
    ({"architectures": ["YolosForObjectDetection"]}, ("vision", "object-detection")),
    ({"architectures": ["LlavaForConditionalGeneration"], "vision_config": {}, "text_config": {}}, ("vlm", None)),
    ({"architectures": ["LlamaForCausalLM"]}, ("llm", None)),
])
def test_kind_comes_from_config_architectures(tmp_path, config, expected):
    from llmcompress.vision.kind import spec_kind

    folder = _folder(tmp_path, "m", config)
    assert spec_kind(load_recipe(_recipe(str(folder), {"type": "benchmark"}))) == expected


def test_builtin_vision_models_are_known_without_building_them():
    from llmcompress.vision.kind import spec_kind

    r = load_recipe(_recipe("digits-convnext", {"type": "quantize", "method": "dynamic-int8"}))
    assert spec_kind(r) == ("vision", "image-classification")
    assert spec_kind(load_recipe(_recipe("tiny-random-yolos"))) == ("vision", "object-detection")
    assert spec_kind(load_recipe(_recipe("tiny-random-llama"))) == ("llm", None)


def test_explicit_kind_and_task_are_checked_against_the_config(tmp_path):
    folder = _folder(tmp_path, "vit", {"architectures": ["ViTForImageClassification"]})
    r = load_recipe(_recipe({"source": str(folder), "kind": "vision", "task": "image-classification"}))
    assert (r.model.kind, r.model.task) == ("vision", "image-classification")
    with pytest.raises(RecipeError, match=r"`kind: llm`, but .* is a vision \(image-classification\) model.*Fix: set "
                                          r"`kind: vision`"):
        load_recipe(_recipe({"source": str(folder), "kind": "llm"}))
    with pytest.raises(RecipeError, match=r"`task: object-detection`, but .* image-classification model.*Fix"):
        load_recipe(_recipe({"source": str(folder), "task": "object-detection"}))


@pytest.mark.parametrize("stage,words", [
    ({"type": "evaluate", "tasks": ["pydoc_ppl"]}, "`tasks` is for language models"),
    ({"type": "evaluate", "perplexity": {"max_tokens": 256}}, "`perplexity` is for language models"),
    ({"type": "evaluate", "backend": "vllm"}, "`backend` is for language models"),
    ({"type": "evaluate", "apply_chat_template": True}, "`apply_chat_template` is for language models"),
    ({"type": "benchmark", "prompt_tokens": 32}, "`prompt_tokens` applies to text generation"),
    ({"type": "benchmark", "backends": ["hf", "vllm"]}, "`backends: [vllm]` applies to text generation"),
    ({"type": "quantize", "method": "gptq"}, "`gptq` calibrates a causal LM"),
    ({"type": "quantize", "method": "llmc-w8a8"}, "`llmc-w8a8` calibrates a causal LM"),
    ({"type": "prune", "method": "wanda", "sparsity": 0.5}, "`wanda` scores weights with text activations"),
    ({"type": "lora", "objective": "sft", "data": {"source": "builtin:pydoc"}}, "`data` names text"),
    ({"type": "evaluate", "data": {"source": "builtin:digits-detect"}}, "is object-detection data"),
    ({"type": "lora", "objective": "sft", "accelerate": {"num_processes": 2}}, "vision LoRA trains in one process"),
])
def test_llm_only_settings_on_a_vision_model_fail_when_the_recipe_loads(stage, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe("digits-convnext", stage))
    msg = str(e.value)
    assert "stages[0]" in msg and words in msg and "Fix:" in msg, msg


def test_export_formats_and_structured_rules():
    vision = "digits-convnext"
    with pytest.raises(RecipeError, match=r"`format: gguf` writes a language model.*Fix: use `format: hf`"):
        load_recipe(_recipe(vision, {"type": "quantize", "method": "bnb-nf4"}, {"type": "export", "format": "gguf"}))
    with pytest.raises(RecipeError, match=r"stages\[1\].*`bnb-nf4` loads the model through `from_pretrained`.*"
                                          r"Fix: use rtn, hqq or dynamic-int8"):
        load_recipe(_recipe(vision, {"type": "prune", "method": "structured", "sparsity": 0.5},
                            {"type": "quantize", "method": "bnb-nf4"}))
    ok = load_recipe(_recipe(vision, {"type": "prune", "method": "structured", "sparsity": 0.5},
                             {"type": "quantize", "method": "hqq"}))
    assert ok.stages[1].method == "hqq"
    with pytest.raises(RecipeError, match=r"stages\[1\].*already `structured`-pruned.*Fix: prune once"):
        load_recipe(_recipe(vision, {"type": "prune", "method": "structured", "sparsity": 0.5},
                            {"type": "prune", "method": "magnitude", "sparsity": 0.5}))
    with pytest.raises(RecipeError, match=r"`pattern` is N:M sparsity within rows"):
        load_recipe(_recipe(vision, {"type": "prune", "method": "structured", "pattern": "2:4"}))


@pytest.mark.parametrize("stage,words", [
    ({"type": "evaluate", "data": {"source": "builtin:digits"}}, "`data` gives the images a vision model"),
    ({"type": "lora", "objective": "sft", "data": {"source": "builtin:digits"}}, "`data` names images"),
    ({"type": "prune", "method": "structured", "sparsity": 0.5}, "`structured` removes MLP channels"),
])
def test_vision_only_settings_on_an_llm_fail(stage, words):
    with pytest.raises(RecipeError, match=re.escape(words) + ".*Fix:"):
        load_recipe(_recipe("tiny-random-llama", stage))


def test_vlm_rules(tmp_path):
    folder = _folder(tmp_path, "llava", {"architectures": ["LlavaForConditionalGeneration"], "vision_config": {},
                                         "text_config": {}})
    ok = load_recipe(_recipe(str(folder), {"type": "quantize", "method": "rtn"}, {"type": "evaluate"}))
    assert ok.stages[0].method == "rtn"
    with pytest.raises(RecipeError, match=r"`gptq` runs a causal LM's calibration.*Fix: use one of rtn"):
        load_recipe(_recipe(str(folder), {"type": "quantize", "method": "gptq"}))
    with pytest.raises(RecipeError, match=r"the lora stage is not supported on vision-language models"):
        load_recipe(_recipe(str(folder), {"type": "lora", "objective": "sft"}))


def test_lora_data_is_text_or_images_by_its_source():
    from llmcompress.data.calibration import CalibrationConfig
    from llmcompress.vision.data import ImageDataConfig

    r = load_recipe(_recipe("digits-convnext", {"type": "lora", "objective": "sft",
                                                 "data": {"source": "builtin:digits", "samples": 64}}))
    assert isinstance(r.stages[0].data, ImageDataConfig) and r.stages[0].data.samples == 64
    r = load_recipe(_recipe("tiny-random-llama", {"type": "lora", "objective": "sft",
                                                   "data": {"source": "builtin:pydoc", "seq_len": 64}}))
    assert isinstance(r.stages[0].data, CalibrationConfig)
    with pytest.raises(RecipeError, match=r"`source: builtin:digitz` must be|source `builtin:digitz` must be"):
        load_recipe(_recipe("digits-convnext", {"type": "evaluate", "data": {"source": "builtin:digitz"}}))


def test_timm_models_are_refused_with_the_fix_when_timm_does_not_import(tmp_path):
    from llmcompress.vision.timm import timm_problem

    folder = _folder(tmp_path, "timm", {"architectures": ["TimmWrapperForImageClassification"],
                                        "model_type": "timm_wrapper", "architecture": "resnet18"})
    problem = timm_problem()
    if problem is None:  # where timm and a matching torchvision import, the folder passes this check
        load_recipe(_recipe(str(folder)))
        return
    with pytest.raises(RecipeError, match=r"is a timm model, and .*Fix: install timm with a torchvision built for"):
        load_recipe(_recipe(str(folder)))


def test_cli_validate_exits_2_without_traceback(tmp_path):
    from tests.unit.test_cli import cli

    f = tmp_path / "r.yaml"
    f.write_text("name: r\nmodel: digits-convnext\nstages:\n  - {type: evaluate, tasks: [pydoc_ppl]}\n")
    r = cli("validate", f)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stages[0] (evaluate)" in r.stderr and "Fix:" in r.stderr


def test_shipped_vision_recipes_validate_and_read_light():
    from tests.unit.test_import_light import _imported_after

    for name in ("vision-quickstart", "vision-prune-lora"):
        r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert r.model.source == "digits-convnext"
        assert _imported_after(f"from llmcompress import load_recipe\nload_recipe({str(ROOT / 'recipes' / name)!r}"
                               " + '.yaml')") == []


def test_docstring_samples_of_the_vision_stages_load():
    import llmcompress.vision.evaluate as ev
    import llmcompress.vision.lora as lo
    import llmcompress.vision.prune as pr

    for module in (ev, lo):
        block = re.search(r"\n(    - type: .*?)\n\n", module.__doc__, re.S).group(1)
        stages = yaml.safe_load(block.replace("\n    ", "\n").strip())
        load_recipe(_recipe("digits-convnext", *stages))
    samples = [yaml.safe_load(s) for s in re.findall(r"\{type: prune[^}]*\}", sys.modules[pr.__name__].__doc__)]
    assert {s["method"] for s in samples} == {"magnitude", "structured"}
    for s in samples:
        load_recipe(_recipe("digits-convnext", s))


@pytest.mark.parametrize("name, text, expected", [
    ("config.json", "{bad", "config.json of `{}` is not valid JSON (line 1)"),
    ("config.json", "[1, 2]", "config.json of `{}` holds a JSON list, not an object"),
    ("llmcompress.json", "{\n  oops", "llmcompress.json of `{}` is not valid JSON (line 2)"),
])
def test_a_corrupt_model_json_fails_with_the_file_and_the_fix(tmp_path, name, text, expected):
    from llmcompress.errors import LLMCompressError
    from llmcompress.vision.kind import folder_kind
    from llmcompress.vision.timm import check_timm

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / name).write_text(text)
    with pytest.raises(LLMCompressError) as err:
        folder_kind(tmp_path)
    msg = str(err.value)
    assert expected.format(tmp_path) in msg and "Fix: re-save the model with save_pretrained" in msg
    if name == "config.json":
        with pytest.raises(LLMCompressError, match="not"):
            check_timm(str(tmp_path), tmp_path / name)
