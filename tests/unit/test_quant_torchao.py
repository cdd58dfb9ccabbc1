"""torchao int8/int4 on the tiny model: the stage, honest sizes, save/reload (plain from_pretrained for int8, our
portable layout for CPU int4, both also in a fresh process), skip, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchao")

from llmcompress.errors import RecipeError  # noqa: E402
from llmcompress.models.loading import load_model  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n"
# Max |logit change| vs the bf16 original. These logits span about -0.6..1.2 and bf16 rounding alone moves them by
# ~0.008; measured: int8 weight-only 0.008, int8 dynamic 0.010, int4 0.07 (g64) to 0.09 (g32). A broken kernel or a
# wrong reload moves them by O(1). Each bound is a few times the measured error and well below that.
TOLERANCE = {"torchao-int8wo": 0.05, "torchao-int8dq": 0.05, "torchao-int4wo": 0.3}
WEIGHT_TYPE = {"torchao-int8wo": "Int8Tensor", "torchao-int8dq": "Int8Tensor", "torchao-int4wo": "Int4OpaqueTensor"}


def _logits(model, tokenizer, text=TEXT):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def _run(make_ctx, method, **stage):
    ctx = make_ctx(stages=[{"type": "quantize", "method": method, **stage}])
    return ctx, ctx.recipe.stages[0].run(ctx)


def _weight_type(model, name):
    return type(model.get_submodule(name).weight).__name__


@pytest.mark.parametrize("method", list(TOLERANCE))
def test_torchao_stage_quantizes_and_reloads_identically(make_ctx, method):
    ctx, result = _run(make_ctx, method)
    assert result.data["quantized_modules"] == 14 and result.data["skipped_modules"] == ["lm_head"]
    assert ctx.current.meta["format"] == "torchao" and ctx.current.meta["torchao"]["variant"] == method
    model, tok = ctx.current.load()
    assert _weight_type(model, "model.layers.0.mlp.up_proj") == WEIGHT_TYPE[method]
    assert _weight_type(model, "lm_head") == "Parameter"

    reloaded, _ = load_model(ctx.current.path, "cpu", "bfloat16")
    assert _weight_type(reloaded, "model.layers.1.self_attn.k_proj") == WEIGHT_TYPE[method]
    assert _weight_type(reloaded, "lm_head") == "Parameter"
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))

    orig, _ = ctx.original.load()
    assert _weight_type(orig, "model.layers.0.mlp.up_proj") == "Parameter"  # the original is untouched
    err = (_logits(orig, tok) - _logits(model, tok)).abs().max().item()
    assert 0 < err < TOLERANCE[method]


@pytest.mark.parametrize("method", list(TOLERANCE))
def test_torchao_run_in_fp32_reloads_identically(make_ctx, method):
    # CPUs without native bf16 run in fp32 while dense parts are saved in the original's bf16
    ctx = make_ctx(stages=[{"type": "quantize", "method": method}], dtype="float32")
    ctx.recipe.stages[0].run(ctx)
    model, tok = ctx.current.load()
    reloaded, _ = load_model(ctx.current.path, "cpu", "float32")
    assert reloaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))
    if method == "torchao-int4wo":  # int4 layers compute in bf16 (the fast kernel), between fp32 layers
        for m in (model, reloaded):
            layer = m.get_submodule("model.layers.0.mlp.up_proj")
            assert layer.weight.dtype == torch.bfloat16 and layer(torch.randn(2, 64)).dtype == torch.float32
    orig, _ = ctx.original.load()
    assert 0 < (_logits(orig, tok) - _logits(model, tok)).abs().max().item() < TOLERANCE[method]


@pytest.mark.parametrize("method,ratio", [("torchao-int8wo", 0.8), ("torchao-int4wo", 0.65)])
def test_torchao_is_smaller_on_disk_and_in_memory(make_ctx, method, ratio):
    # tiny model: 74k linear weights next to a 33k bf16 tied embedding that no method here quantizes
    ctx, result = _run(make_ctx, method)
    assert ctx.current.size_bytes < ratio * ctx.original.size_bytes
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    embedding = 512 * 64 * 2
    bits = 8 if "int8" in method else 4
    # honest count: quantized payload + scales (one per row for int8, a scale and a zero per 64 for int4) + the rest
    assert embedding + linear * bits / 8 < result.data["param_bytes"] < embedding + linear * (bits / 8 + 0.1) + 4096


def test_int8_folder_loads_with_plain_from_pretrained(make_ctx):
    from transformers import AutoModelForCausalLM

    ctx, _ = _run(make_ctx, "torchao-int8dq")
    model, tok = ctx.current.load()
    plain = AutoModelForCausalLM.from_pretrained(ctx.current.path, device_map="cpu")
    assert _weight_type(plain, "model.layers.0.mlp.up_proj") == "Int8Tensor"
    assert torch.equal(_logits(model, tok), _logits(plain, tok))


def test_reload_in_a_fresh_process(make_ctx, tmp_path):
    """int4 (our layout) through load_model and int8 through bare transformers, in a process that quantized nothing."""
    from llmcompress.quant.torchao import TorchaoInt4WeightOnlyConfig, TorchaoInt8WeightOnlyConfig

    ctx = make_ctx(stages=[{"type": "quantize", "method": "torchao-int4wo"}])
    folders = {}
    for stage in (TorchaoInt4WeightOnlyConfig(group_size=32), TorchaoInt8WeightOnlyConfig()):
        ctx.current = ctx.original  # each quantizes the original (a recipe allows one quantize stage)
        stage.run(ctx)
        model, tok = ctx.current.load()
        torch.save(_logits(model, tok), tmp_path / f"{stage.method}.pt")
        folders[stage.method] = ctx.current.path.rename(tmp_path / stage.method)  # frees the stage folder
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from llmcompress.models.loading import load_model\n"
        "int4, int8, ref4, ref8 = sys.argv[1:]\n"
        "m4, tok = load_model(int4, 'cpu', 'bfloat16')\n"
        "m8 = AutoModelForCausalLM.from_pretrained(int8, device_map='cpu')\n"
        f"ids = tok({TEXT!r}, return_tensors='pt')\n"
        "for m, ref in ((m4, ref4), (m8, ref8)):\n"
        "    with torch.no_grad(): out = m(**ids).logits.float()\n"
        "    assert torch.equal(out, torch.load(ref)), (out - torch.load(ref)).abs().max()\n"
        "print('identical', type(m4.model.layers[0].mlp.up_proj.weight).__name__)\n"
    )
    args = [folders["torchao-int4wo"], folders["torchao-int8wo"], tmp_path / "torchao-int4wo.pt",
            tmp_path / "torchao-int8wo.pt"]
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "identical Int4OpaqueTensor" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("n,k", [(16, 64), (48, 64), (96, 128), (576, 1536)])
def test_int4_plain_layout_round_trips_through_the_cpu_packing(n, k):
    from llmcompress.quant.torchao import _pack_cpu, packed_from_plain, plain_from_packed

    values = torch.randint(0, 16, (n, k), dtype=torch.int32)
    plain = plain_from_packed(_pack_cpu(values), n, k)
    assert plain.shape == (n, k // 2) and plain.dtype == torch.uint8
    assert torch.equal((plain & 15).to(torch.int32), values[:, 0::2])  # low nibble = even column, portable
    assert torch.equal((plain >> 4).to(torch.int32), values[:, 1::2])
    assert torch.equal(packed_from_plain(plain, n, k), _pack_cpu(values))


@pytest.mark.parametrize("method", ["torchao-int8wo", "torchao-int4wo"])
def test_torchao_skip_by_regex_and_quantized_lm_head(make_ctx, method):
    ctx, result = _run(make_ctx, method, skip=[r"model\.layers\.0\..*"])  # lm_head no longer skipped
    assert result.data["quantized_modules"] == 8  # layer 1's 7 linears + lm_head
    reloaded, tok = load_model(ctx.current.path, "cpu", "bfloat16")
    assert _weight_type(reloaded, "model.layers.0.mlp.up_proj") == "Parameter"
    assert _weight_type(reloaded, "model.layers.1.mlp.up_proj") == WEIGHT_TYPE[method]
    assert _weight_type(reloaded, "lm_head") == WEIGHT_TYPE[method]
    assert _weight_type(reloaded, "model.embed_tokens") == "Parameter"  # untied: the embedding stays bf16
    model, _ = ctx.current.load()
    assert torch.equal(_logits(model, tok), _logits(reloaded, tok))


def test_int4_group_size_must_divide_width(make_ctx):
    with pytest.raises(RecipeError, match=r"group_size 128 does not divide the input width 64 of `model\..*`\. Fix"):
        _run(make_ctx, "torchao-int4wo", group_size=128)


def test_int4_group_size_is_checked_when_the_recipe_loads():
    from llmcompress.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"group_size"):
        load_recipe({"name": "x", "model": "tiny-random-llama",
                     "stages": [{"type": "quantize", "method": "torchao-int4wo", "group_size": 48}]})


def test_int4_cpu_folder_refuses_another_device(make_ctx):
    from llmcompress.errors import LLMCompressError

    ctx, _ = _run(make_ctx, "torchao-int4wo")
    with pytest.raises(LLMCompressError, match=r"cpu kernel's layout.*Fix: load it with device cpu"):
        load_model(ctx.current.path, "cuda", "bfloat16")


def test_torchao_without_the_extra_fails_before_loading(monkeypatch):
    import importlib.util

    from llmcompress.errors import MissingExtraError
    from llmcompress.quant.torchao import TorchaoInt4WeightOnlyConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install -c constraints.txt 'llmcompress\[torchao\]'"):
        TorchaoInt4WeightOnlyConfig().preflight()
