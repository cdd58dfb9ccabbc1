"""GPTQ (gptqmodel) on the tiny model: the stage's output loads in plain transformers in a fresh process, beats
round-to-nearest on the layer outputs it was calibrated for, honours `skip`, and bad input fails before heavy work.

The first gptq quantization on a machine compiles gptqmodel's packing kernel (~50 s, cached in ~/.cache/gptqmodel);
after that each quantization of the tiny model takes a few seconds (plus ~10 s to import gptqmodel once).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from llmcompress.errors import RecipeError
from llmcompress.models.loading import load_model

CALIB = {"samples": 8, "seq_len": 64}
GPTQ = {"type": "quantize", "method": "gptq", "bits": 4, "group_size": 32, "calibration": CALIB}
needs_gptqmodel = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(p) for p in ("gptqmodel", "optimum")),
    reason="needs the gptq extra: pip install -c constraints.txt 'llmcompress[gptq]'",
)


def _run(make_ctx, stage: dict):
    ctx = make_ctx(stages=[stage])
    return ctx, ctx.recipe.stages[0].run(ctx)


def _fresh_process_logits(path, ids: torch.Tensor, tmp_path) -> tuple[torch.Tensor, str]:
    """Logits of the folder loaded by plain transformers in a new Python process (no llmcompress, no gptqmodel
    import)."""
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype=torch.bfloat16).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print('LAYER', type(m.get_submodule('model.layers.0.mlp.up_proj')).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    layer = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("LAYER "))
    return torch.load(tmp_path / "logits.pt"), layer


def _layer_output_errors(reference, quantized_models: dict, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per linear layer: sum of squared output errors of each quantized model, on the reference's own inputs."""
    inputs: dict[str, list[torch.Tensor]] = {}
    targets = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, m in targets.items()]
    with torch.no_grad():
        reference(input_ids=ids)
    for h in hooks:
        h.remove()
    errors: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, xs in inputs.items():
            x = torch.cat(xs)  # (batch, seq, in)
            y = targets[name](x)
            errors[name] = {k: (m.get_submodule(name)(x).float() - y).pow(2).sum().item()
                            for k, m in quantized_models.items()}
    return errors


@needs_gptqmodel
def test_gptq_stage_saves_a_folder_plain_transformers_loads(make_ctx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # gptqmodel would write ./logs/ here if we let it
    ctx, result = _run(make_ctx, GPTQ)
    data = result.data
    assert {"method", "bits", "quantize_seconds", "param_bytes", "size_bytes", "quantized_modules"} <= set(data)
    assert (data["method"], data["bits"], data["quantized_modules"]) == ("gptq", 4.0, 14)  # 2 layers x 7 linears
    assert data["skipped_modules"] == ["lm_head"] and data["calibration"]["tokens"] == 8 * 64
    assert ctx.current.path == ctx.stage_dir / "model"
    assert (ctx.current.meta["format"], ctx.current.meta["method"]) == ("hf", "gptq")
    assert "gptqmodel" in ctx.current.meta["versions"]
    qc = json.loads((ctx.current.path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 32, False)
    assert "offload_to_disk_path" not in qc["meta"] and not (ctx.stage_dir / "gptqmodel-offload").exists()
    assert (ctx.stage_dir / "gptqmodel.log").stat().st_size > 0  # gptqmodel's chatter went here
    assert list(ctx.stage_dir.glob("gptq_log_*.log")) and not (tmp_path / "logs").exists()  # and its own log too
    assert ctx.current.size_bytes < 0.7 * ctx.original.size_bytes

    from safetensors import safe_open

    with safe_open(str(ctx.current.path / "model.safetensors"), "pt") as f:  # dense weights back in the recipe dtype
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.mlp.up_proj.qweight").get_dtype() == "I32"

    model, tok = ctx.current.load()
    ids = tok(["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over it."], return_tensors="pt",
              padding=True)["input_ids"]
    with torch.no_grad():
        here = model(input_ids=ids).logits
    there, layer = _fresh_process_logits(ctx.current.path, ids, tmp_path)
    assert layer != "Linear"  # a GPTQ kernel, not a dequantized copy
    assert torch.allclose(here.float(), there.float(), atol=1e-3)
    orig, _ = ctx.original.load()
    with torch.no_grad():
        assert 0 < (orig(input_ids=ids).logits.float() - here.float()).abs().max() < 1.0


@needs_gptqmodel
def test_gptq_beats_rtn_on_the_layer_outputs_it_calibrated_for(make_ctx):
    """GPTQ minimizes each layer's output error on the calibration inputs; RTN ignores them. Same bits, group and
    symmetry, measured on the calibration windows against the original's layer inputs (all in float32)."""
    import copy

    from llmcompress.data import load_calibration
    from llmcompress.quant.rtn import RTNConfig, quantize_rtn_

    ctx, _ = _run(make_ctx, {**GPTQ, "bits": 3})
    stage = ctx.recipe.stages[0]
    gptq, tok = load_model(ctx.current.path, "cpu", "float32")
    reference, _ = load_model(ctx.original.path, "cpu", "float32")
    rtn = copy.deepcopy(reference)
    quantize_rtn_(rtn, RTNConfig(bits=stage.bits, group_size=stage.group_size, symmetric=stage.sym))
    ids = load_calibration(stage.calibration, tok, model=ctx.original)  # the default source, builtin:mixed
    errors = _layer_output_errors(reference, {"gptq": gptq, "rtn": rtn}, ids)
    assert len(errors) == 14
    assert all(e["gptq"] < e["rtn"] for e in errors.values()), errors
    total = {k: sum(e[k] for e in errors.values()) for k in ("gptq", "rtn")}
    assert total["gptq"] < 0.8 * total["rtn"], total  # measured: 0.69x (3 and 4 bits)


@needs_gptqmodel
def test_gptq_skip_keeps_layers_dense_in_every_loader(make_ctx):
    ctx, result = _run(make_ctx, {**GPTQ, "skip": ["lm_head", r"model\.layers\.0\..*"]})
    assert result.data["quantized_modules"] == 7
    qc = json.loads((ctx.current.path / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {f"-:^{re.escape('model.layers.0.' + m)}$": {} for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # gptqmodel and vLLM read this
    assert len(qc["modules_in_block_to_quantize"][0]) == 7  # transformers/optimum read this
    model, _ = ctx.current.load()
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear"
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")).__name__ != "Linear"
    orig, tok = ctx.original.load()
    ids = tok("for x in range(3): print(x)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.model.layers[0].mlp.up_proj.weight, orig.model.layers[0].mlp.up_proj.weight)
        assert (orig(input_ids=ids).logits.float() - model(input_ids=ids).logits.float()).abs().max() < 1.0


# --- errors before heavy work (no quantization runs) -------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("bits", 5, r"`bits`: must be 2, 3, 4 or 8"),
    ("group_size", 0, r"`group_size`: must be a positive divisor"),
    ("damp_percent", 1.5, r"`damp_percent`: Input should be less than 1"),
    ("calibration", {"samples": 0}, r"`calibration\.samples`: Input should be greater than or equal to 1"),
    # a nested unknown key names its block and suggests that block's keys
    ("calibration", {"sample": 4}, r"unknown key `sample` in `calibration`\. Did you mean `samples`\?"),
])
def test_bad_values_rejected_when_the_recipe_loads(field, value, message):
    from llmcompress.recipe import load_recipe

    with pytest.raises(RecipeError, match=rf"stages\[0\] \(quantize\): {message}"):
        load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [{**GPTQ, field: value}]})


@needs_gptqmodel
@pytest.mark.parametrize("change,message", [
    ({"group_size": 48}, (r"group_size 48 does not divide the input width 64 of `model\.layers\.0\.self_attn\.q_proj` "
                          r"\(\d+ layers affected\)\. Fix: use a divisor of 64, 128 such as 32 or 64, or -1")),
    ({"skip": []}, r"gptq keeps `lm_head` dense: .* Fix: keep `lm_head` in `skip`"),
    ({"skip": ["lm_head", "model.*"]}, r"`skip` leaves no linear layer to quantize"),
    ({"calibration": {"source": "missing/calib.txt"}}, r"no such file `.*missing/calib\.txt`\. Fix: check the path"),
    ({"calibration": {"seq_len": 4096}}, (r"calibration\.seq_len 4096 exceeds the model's max_position_embeddings "
                                          r"\(1024\)\. Fix")),
])
def test_bad_settings_fail_before_weights_load(make_ctx, change, message):
    ctx = make_ctx(stages=[{**GPTQ, **change}])
    with pytest.raises(RecipeError, match=message):
        ctx.recipe.stages[0].run(ctx)
    assert ctx.original._loaded is None and not (ctx.stage_dir / "model").exists()


@needs_gptqmodel
def test_gptq_refuses_an_already_quantized_model(make_ctx):
    ctx = make_ctx(stages=[{"type": "quantize", "method": "rtn", "group_size": 32}])
    ctx.recipe.stages[0].run(ctx)  # ctx.current is now the rtn folder
    from llmcompress.quant.gptq import GPTQConfig

    with pytest.raises(RecipeError, match=r"gptq quantizes a dense model, but the model here is already `rtn`\. "
                                          r"Fix: put this stage first"):
        GPTQConfig.model_validate(GPTQ).run(ctx)


def test_gptq_without_the_extra_fails_before_loading(monkeypatch):
    import importlib.util

    from llmcompress.errors import MissingExtraError
    from llmcompress.quant.gptq import GPTQConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install -c constraints.txt 'llmcompress\[gptq\]'"):
        GPTQConfig().preflight()


def test_gptq_config_defaults():
    from llmcompress.quant.gptq import GPTQConfig

    c = GPTQConfig()
    assert (c.bits, c.group_size, c.desc_act, c.sym, c.damp_percent, c.skip) == (4, 64, False, False, 0.05, ["lm_head"])
    assert (c.calibration.source, c.calibration.samples, c.calibration.seq_len) == ("builtin:mixed", 16, 256)
