"""Quantization methods on the tiny model: error bounds, packing, save/reload, skipping and clear errors."""

from __future__ import annotations

import pytest
import torch

from llmcompress.errors import RecipeError
from llmcompress.models.loading import load_model
from llmcompress.quant.rtn import RTNConfig, _pack, _unpack
from llmcompress.utils.io import read_json

TEXT = "def add(a, b):\n    return a + b\n"


def _logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (7, 100), dtype=torch.int32)
    assert torch.equal(_unpack(_pack(q, bits), bits, 100), q)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_shrinks_with_bits(symmetric):
    from llmcompress.quant.rtn import RTNLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 16)
    errs = []
    for bits in (2, 4, 8):
        q = RTNLinear.from_linear(lin, bits, 32, symmetric)
        errs.append((q.dequantize().float() - lin.weight).abs().max().item())
        # a weight is off by at most half a quantization step of its group
        step = (lin.weight.reshape(16, 4, 32).amax(-1) - lin.weight.reshape(16, 4, 32).amin(-1)).max() / (2**bits - 1)
        assert errs[-1] <= (step if symmetric else step / 2 + 1e-6) * 1.01 + 1e-6
        x = torch.randn(3, 128)
        assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantize().float(), lin.bias), atol=1e-5)
    assert errs[0] > errs[1] > errs[2]


def _run(make_ctx, stage: dict):
    ctx = make_ctx(stages=[stage])
    result = ctx.recipe.stages[0].run(ctx)
    return ctx, result


def test_rtn_stage_saves_a_smaller_model_that_reloads(make_ctx):
    ctx, result = _run(make_ctx, {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 32})
    assert result.model_dir == "model" and result.data["quantized_modules"] == 14  # 2 layers x 7 linears
    assert ctx.current.path == ctx.stage_dir / "model" and ctx.current.meta["format"] == "compressed-tensors"
    assert ctx.current.meta["reload_check"]["max_abs_logit_diff"] == 0.0
    assert ctx.current.size_bytes < 0.6 * ctx.original.size_bytes
    model, tok = ctx.current.load()
    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))
    orig, _ = ctx.original.load()
    assert 0 < (_logits(orig, tok) - _logits(model, tok)).abs().max() < 1.0  # the original is untouched
    assert "lm_head" in read_json(ctx.current.path / "config.json")["quantization_config"]["ignore"]  # skipped


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False), (3, False)])
def test_rtn_folder_is_the_same_model_in_plain_transformers_in_a_fresh_process(make_ctx, tmp_path, bits, symmetric):
    """The folder is compressed-tensors pack-quantized: AutoModelForCausalLM.from_pretrained alone (no llmcompress)
    computes exactly what the rtn layers computed in memory."""
    import subprocess
    import sys

    from llmcompress.quant.rtn import quantize_rtn_

    ctx, _ = _run(make_ctx, {"type": "quantize", "method": "rtn", "bits": bits, "group_size": 32,
                             "symmetric": symmetric})
    model, tok = load_model(ctx.original.path, "cpu", "bfloat16")
    quantize_rtn_(model, RTNConfig(bits=bits, group_size=32, symmetric=symmetric))
    expected = _logits(model, tok)
    out = tmp_path / "logits.pt"
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "folder, out, text = sys.argv[1:4]\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)\n"
        "ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(model(**ids).logits.float(), out)\n"
        "assert not any(m.split('.')[0] == 'llmcompress' for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ctx.current.path), str(out), TEXT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(out), expected)


def test_rtn_group_size_must_divide_width(make_ctx):
    with pytest.raises(RecipeError, match=r"group_size 48 does not divide the input width 64 .* Fix"):
        _run(make_ctx, {"type": "quantize", "method": "rtn", "group_size": 48})


def test_skip_by_regex(make_ctx):
    ctx, result = _run(make_ctx, {"type": "quantize", "method": "rtn", "group_size": 32,
                                  "skip": ["lm_head", r"model\.layers\.0\..*"]})
    assert result.data["quantized_modules"] == 7
    from safetensors import safe_open

    with safe_open(str(ctx.current.path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight" in keys and "model.layers.0.mlp.up_proj.weight_packed" not in keys
    assert "model.layers.1.mlp.up_proj.weight_packed" in keys and "model.layers.1.mlp.up_proj.weight" not in keys


@pytest.mark.parametrize(
    "method,layer", [("bnb-nf4", "Linear4bit"), ("bnb-fp4", "Linear4bit"), ("bnb-int8", "Linear8bitLt")]
)
def test_bnb_methods_quantize_and_reload(make_ctx, method, layer):
    pytest.importorskip("bitsandbytes")
    ctx, result = _run(make_ctx, {"type": "quantize", "method": method})
    model, tok = ctx.current.load()
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == layer
    assert type(model.get_submodule("lm_head")).__name__ == "Linear"
    assert ctx.current.size_bytes < ctx.original.size_bytes
    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert torch.allclose(_logits(model, tok), _logits(reloaded, tok), atol=1e-3)
    orig, _ = ctx.original.load()
    assert (_logits(orig, tok) - _logits(model, tok)).abs().max() < 1.0


def test_bnb_without_the_extra_fails_before_loading(monkeypatch):
    import importlib.util

    from llmcompress.errors import MissingExtraError
    from llmcompress.quant.bnb import BnbNF4Config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install -c constraints.txt 'llmcompress\[bnb\]'"):
        BnbNF4Config().preflight()


def test_yaml_samples_in_docstrings_validate():
    import re

    import yaml

    from llmcompress.quant import QUANTIZERS
    from llmcompress.recipe import load_recipe

    for name in QUANTIZERS.names():
        cls = QUANTIZERS.get(name)
        import sys

        doc = (cls.__doc__ or "") + (sys.modules[cls.__module__].__doc__ or "")
        samples = [yaml.safe_load(s) for s in re.findall(r"\{type: quantize[^}]*\}", doc)]
        assert samples, f"{name}: no YAML sample in its docstring"
        for s in samples:
            load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [s]})


def test_rtn_config_defaults():
    c = RTNConfig()
    assert (c.bits, c.group_size, c.symmetric) == (4, 64, False)


@pytest.mark.parametrize("method", ["rtn", "bnb-nf4"])
def test_fp32_runtime_saves_dense_parts_in_the_originals_dtype(make_ctx, method):
    """Running in fp32 must not double the saved size of what stays unquantized; reload == in memory."""
    if method.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    stage = {"type": "quantize", "method": method, **({"group_size": 32} if method == "rtn" else {})}
    ctx32 = make_ctx(stages=[stage], dtype="float32")
    ctx32.recipe.stages[0].run(ctx32)
    model, tok = ctx32.current.load()
    assert next(p for p in model.parameters() if p.is_floating_point()).dtype == torch.float32
    reloaded, _ = load_model(ctx32.current.path, "cpu", "float32")
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))
    import json

    assert json.loads((ctx32.current.path / "config.json").read_text())["dtype"] == "bfloat16"
    assert ctx32.current.size_bytes < 0.7 * ctx32.original.size_bytes  # original is stored in bf16
