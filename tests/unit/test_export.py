"""The export stage on the tiny model: every format reloads unchanged in a FRESH process by its natural consumer
(transformers `from_pretrained`, `gguf_file=` for GGUF) with the logits of the model the run evaluated; the model card
shows the final report's figures even when written before the evaluate stage; bad recipes fail when they load;
a finished export is resumed, not redone.

One module fixture quantizes and exports everything, then ONE fresh process loads every folder (imports cost ~10 s
each on a busy 2-core box).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from llmcompress.errors import LLMCompressError, RecipeError
from llmcompress.recipe import load_recipe

CALIB = {"samples": 8, "seq_len": 64}
FAST_EVAL = {"type": "evaluate", "tasks": [], "perplexity": {"max_tokens": 512, "ctx_len": 128, "stride": 64}}
RTN = {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32}
#: name -> (quantize stage, export stages, packages needed)
CASES = {
    "bnb-nf4": ({"type": "quantize", "method": "bnb-nf4"}, [{"format": "hf"}], ["bitsandbytes"]),
    "bnb-int8": ({"type": "quantize", "method": "bnb-int8"}, [{"format": "hf"}], ["bitsandbytes"]),
    "gptq": ({"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "calibration": CALIB},
             [{"format": "hf"}, {"format": "compressed-tensors"}], ["gptqmodel", "optimum", "compressed_tensors"]),
    "torchao-int8wo": ({"type": "quantize", "method": "torchao-int8wo"}, [{"format": "hf"}], ["torchao"]),
    "rtn": (RTN, [{"format": "compressed-tensors"}, {"format": "gguf", "gguf_type": "q8_0"}],
            ["compressed_tensors", "gguf"]),
}


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) for p in packages)


def _context(root, tiny, stages: list[dict]):
    from llmcompress.context import ModelHandle, RunContext, Runtime

    recipe = load_recipe({"name": "t", "model": str(tiny), "threads": 1, "dtype": "bfloat16", "stages": stages})
    runtime = Runtime(device="cpu", threads=1, dtype="bfloat16", seed=0)
    runtime.apply()
    original = ModelHandle("original", tiny, runtime)
    return RunContext(recipe=recipe, run_dir=root, runtime=runtime, original=original, current=original)


def _quantize_and_export(root, tiny, quantize: dict, exports: list[dict], ids) -> dict:
    """Run the quantize stage then each export (no in-stage reload check); our logits on ``ids``."""
    ctx = _context(root, tiny, [quantize] + [{"type": "export", "verify": False, **e} for e in exports])
    results = []
    for i, stage in enumerate(ctx.recipe.stages):
        ctx.stage_index, ctx.stage_dir = i, root / f"{i + 1:02d}-{stage.type}"
        ctx.stage_dir.mkdir(parents=True)
        ctx.results[i] = stage.run(ctx)
        results.append(ctx.results[i])
    model, _ = ctx.current.load()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return {"exports": [r.data for r in results[1:]], "logits": logits}


_RELOAD = """
import json, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
jobs, ids = json.load(open(sys.argv[1])), torch.load(sys.argv[2])
out = {}
for key, folder, gguf_file in jobs:
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kw).eval()
    layer = m.get_submodule("model.layers.0.mlp.up_proj")
    with torch.no_grad():
        out[key] = {"logits": m(input_ids=ids).logits.float(), "layer": type(layer).__name__,
                    "weight": type(getattr(layer, "weight", None)).__name__}
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """Every case quantized and exported; every export reloaded in one fresh process (no llmcompress imported)."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.tensor([[5, 80, 17, 301, 42, 7, 99, 250, 3, 64, 128, 11]])
    done, jobs = {}, []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # gptqmodel may write ./logs/
        for name, (quantize, exports, needs) in CASES.items():
            if not _installed(*needs):
                continue
            done[name] = _quantize_and_export(root / name, tiny_model_dir, quantize, exports, ids)
            for data in done[name]["exports"]:
                gguf_file = "model.gguf" if data["format"] == "gguf" else None
                jobs.append([f"{name}:{data['format']}", data["path"], gguf_file])
    (root / "jobs.json").write_text(json.dumps(jobs))
    torch.save(ids, root / "ids.pt")
    run = subprocess.run([sys.executable, "-c", _RELOAD, str(root / "jobs.json"), str(root / "ids.pt"),
                          str(root / "out.pt")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return done, torch.load(root / "out.pt")


def _case(exported, name: str, fmt: str):
    done, fresh = exported
    if name not in done:
        pytest.skip(f"needs the packages of {CASES[name][2]}")
    data = next(d for d in done[name]["exports"] if d["format"] == fmt)
    return data, done[name]["logits"], fresh[f"{name}:{fmt}"]


def _path(data: dict):
    from pathlib import Path

    return Path(data["path"])


def _close(ours, theirs, rel: float) -> float:
    diff = float((ours - theirs).abs().max())
    assert diff <= rel * float(ours.abs().max()), (diff, float(ours.abs().max()))
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    return diff


@pytest.mark.parametrize("name, layer", [("bnb-nf4", "Linear4bit"), ("bnb-int8", "Linear8bitLt"),
                                         ("gptq", "TorchAtenLinear"), ("torchao-int8wo", "Linear")])
def test_hf_export_loads_unchanged_with_from_pretrained(exported, name, layer):
    data, ours, fresh = _case(exported, name, "hf")
    assert fresh["layer"] == layer  # still quantized after a plain from_pretrained
    if name == "torchao-int8wo":
        assert fresh["weight"] == "Int8Tensor"
    _close(ours, fresh["logits"], rel=0.02)
    meta = json.loads((_path(data) / "llmcompress.json").read_text())
    assert meta["method"] == name and meta["export"]["format"] == "hf"
    card = (_path(data) / "README.md").read_text()
    assert card.startswith("---\n") and f"- {name}" in card and "from_pretrained(" in card


@pytest.mark.parametrize("name", ["rtn", "gptq"])
def test_compressed_tensors_export_is_pack_quantized_and_reloads(exported, name):
    data, ours, fresh = _case(exported, name, "compressed-tensors")
    qc = json.loads((_path(data) / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 32, "group")
    assert weights["symmetric"] is False and qc["ignore"] == ["lm_head"]
    from safetensors import safe_open

    with safe_open(str(_path(data) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    assert "model.layers.0.mlp.up_proj.weight" not in keys and packed.dtype == torch.int32
    assert packed.shape == (128, 64 * 4 // 32)  # (out, in * bits / 32)
    # transformers decompresses to dense Linear on CPU; the numbers are the quantizer's own (nothing re-rounded)
    assert fresh["layer"] == "Linear"
    _close(ours, fresh["logits"], rel=0.01 if name == "rtn" else 0.03)
    if name == "rtn":  # rtn's quantize stage writes pack-quantized itself: the export copies that folder
        assert data["converted"] is False
    else:
        assert data["scheme"]["quantized_layers"] == 14 and data["converted"] is True


def test_gguf_export_names_tensors_like_llama_cpp_and_reloads(exported):
    data, ours, fresh = _case(exported, "rtn", "gguf")
    import gguf

    reader = gguf.GGUFReader(str(_path(data) / "model.gguf"))
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["token_embd.weight"] == "Q8_0" and names["blk.1.ffn_down.weight"] == "Q8_0"
    assert names["blk.0.attn_norm.weight"] == "F32" and "output_norm.weight" in names
    assert "output.weight" not in names  # tied to token_embd, as llama.cpp writes it
    assert len(names) == 2 * 9 + 2
    fields = {k: reader.get_field(k).contents() for k in ("general.architecture", "llama.block_count",
                                                           "llama.attention.head_count_kv", "tokenizer.ggml.model")}
    assert fields == {"general.architecture": "llama", "llama.block_count": 2, "llama.attention.head_count_kv": 1,
                      "tokenizer.ggml.model": "gpt2"}
    # q8_0 on top of 4-bit rtn: a second rounding, so close but not exact (q/k permutation undone by the reader)
    assert fresh["layer"] == "Linear"
    _close(ours, fresh["logits"], rel=0.05)


def test_pipeline_card_shows_final_figures_and_resume_keeps_the_export(tmp_path):
    from llmcompress.pipeline import run_recipe

    raw = {"name": "exp", "model": "tiny-random-llama", "threads": 1,
           "stages": [RTN, {"type": "export", "format": "compressed-tensors"}, FAST_EVAL]}
    out = tmp_path / "run"
    report = run_recipe(load_recipe(raw), out, show_progress=False)
    stage = report["stages"][1]
    reload = stage["data"]["reload"]  # the in-stage check: a fresh process, from_pretrained
    assert reload["top1_agreement"] == 1.0 and reload["max_abs_logit_diff"] < 1e-3
    folder = out / "02-export" / "model"
    assert stage["data"]["path"] == str(folder.resolve()) and stage["dir"] == "02-export"
    card = (folder / "README.md").read_text()
    ppl = report["models"]["compressed"]["eval"]["perplexity"]["perplexity"]
    from llmcompress.report import metrics as M

    # written before the evaluate stage ran, refreshed with the final report's figures at the end
    assert report["headline"].split(" — ")[0] in card and M.fmt_number(ppl) in card
    assert "kl_mean" in card and M.fmt_bytes(report["comparison"]["size"]["compressed_bytes"]) in card
    assert "quantization:" in card and "method: rtn" in card and "compressed-tensors (pack-quantized)" in card
    assert "Not evaluated yet" not in card and "AutoModelForCausalLM.from_pretrained(" in card
    assert not (out / "report.md").read_text().count("Traceback")

    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_recipe(load_recipe(raw), out, show_progress=False)
    assert all(s["resumed"] for s in again["stages"])
    assert weights.stat().st_mtime_ns == before  # not redone
    assert M.fmt_number(ppl) in (folder / "README.md").read_text()


def test_recipe_rejects_bad_exports_before_any_weights_load(tiny_model_dir):
    def load(quant: dict | None, export: dict):
        stages = ([quant] if quant else []) + [{"type": "export", **export}]
        return load_recipe({"name": "x", "model": str(tiny_model_dir), "stages": stages})

    with pytest.raises(RecipeError, match=r"unknown export format `compresed-tensors`\. Did you mean "
                                          r"`compressed-tensors`\?"):
        load(RTN, {"format": "compresed-tensors"})
    with pytest.raises(RecipeError, match=r"stages\[1\] \(export\): compressed-tensors cannot hold `bnb-nf4` "
                                          r"weights.*NormalFloat.*Fix: quantize with `rtn`, `gptq`"):
        load({"type": "quantize", "method": "bnb-nf4"}, {"format": "compressed-tensors"})
    with pytest.raises(RecipeError, match=r"`rtn` saves llmcompress's own layout.*Fix: set `dequantize: true`"):
        load(RTN, {"format": "hf"})
    with pytest.raises(RecipeError, match="no quantize stage comes before"):
        load(None, {"format": "compressed-tensors"})
    with pytest.raises(RecipeError, match="desc_act"):
        load({"type": "quantize", "method": "gptq", "desc_act": True}, {"format": "compressed-tensors"})
    with pytest.raises(RecipeError, match=r"`gguf_type` applies to `format: gguf`"):
        load(RTN, {"format": "hf", "dequantize": True, "gguf_type": "q8_0"})
    with pytest.raises(RecipeError, match="unknown key `gguf_typ`"):
        load(RTN, {"format": "gguf", "gguf_typ": "q8_0"})
    assert load(RTN, {"format": "hf", "dequantize": True}).stages[1].format == "hf"


def test_export_refuses_to_replace_a_folder_it_did_not_write(tmp_path, tiny_model_dir):
    from llmcompress.export.stage import ExportStage

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    ctx = _context(tmp_path, tiny_model_dir, [{"type": "export", "path": str(precious)}])
    ctx.stage_dir = tmp_path / "01-export"
    ctx.stage_dir.mkdir()
    with pytest.raises(LLMCompressError, match="not an earlier llmcompress export"):
        ExportStage(path=str(precious)).run(ctx)
    assert (precious / "notes.txt").read_text() == "keep me"
