"""llmcompressor methods on the tiny model: llmc-gptq-w4a16, llmc-awq-w4a16, llmc-w8a8 (compressed-tensors) and the
sparsegpt / llmc-wanda pruners. Each runs once (module fixture, float32 runtime as on CPUs without native bf16); one
fresh Python process then loads every saved folder with plain transformers and must reproduce the logits of the model
llmcompressor produced in memory. Bad settings fail before any weights load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcompress.errors import RecipeError

pytest.importorskip("llmcompressor", reason="needs the llmcompressor extra: "
                    "pip install -c constraints.txt 'llmcompress[llmcompressor]'")

CALIB = {"samples": 8, "seq_len": 64}
STAGES = {
    "llmc-gptq-w4a16": {"type": "quantize", "method": "llmc-gptq-w4a16", "group_size": 32, "calibration": CALIB},
    "llmc-awq-w4a16": {"type": "quantize", "method": "llmc-awq-w4a16", "group_size": 32, "calibration": CALIB},
    "llmc-w8a8": {"type": "quantize", "method": "llmc-w8a8", "calibration": CALIB},
    "sparsegpt": {"type": "prune", "method": "sparsegpt", "pattern": "2:4", "calibration": CALIB},
    "llmc-wanda": {"type": "prune", "method": "llmc-wanda", "sparsity": 0.5, "calibration": CALIB},
}
QUANT = ["llmc-gptq-w4a16", "llmc-awq-w4a16", "llmc-w8a8"]
PROBE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n"


def _ctx(root: Path, model_dir: Path, stage: dict):
    """A RunContext on the tiny model, as the `make_ctx` fixture builds it, but float32 and module-scoped."""
    from llmcompress.context import ModelHandle, RunContext, Runtime
    from llmcompress.recipe import load_recipe

    recipe = load_recipe({"name": "t", "model": str(model_dir), "threads": 1, "dtype": "float32", "stages": [stage]})
    runtime = Runtime(device="cpu", threads=1, dtype="float32", seed=0)
    runtime.apply()
    original = ModelHandle("original", model_dir, runtime)
    (root / "01-stage").mkdir(parents=True)
    return RunContext(recipe=recipe, run_dir=root, runtime=runtime, original=original, current=original,
                      stage_dir=root / "01-stage")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """method -> (ctx, result, logits of the in-memory compressed model on PROBE, probe ids)."""
    from llmcompress.quant.llmcompressor import _LlmcConfig

    out, captured = {}, {}
    original = _LlmcConfig.save_pretrained

    def spy(self, ctx, model, tokenizer, path, meta):  # the model as llmcompressor left it, before it is compressed
        ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            captured[self.method] = model(input_ids=ids).logits.float()
        return original(self, ctx, model, tokenizer, path, meta)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_LlmcConfig, "save_pretrained", spy)
        for method, stage in STAGES.items():
            ctx = _ctx(tmp_path_factory.mktemp(method), tiny_model_dir, stage)
            result = ctx.recipe.stages[0].run(ctx)
            model, tok = ctx.current.load()
            ids = tok(PROBE, return_tensors="pt")["input_ids"]
            if method not in captured:  # pruners: the in-memory model is the one later stages reuse
                with torch.no_grad():
                    captured[method] = model(input_ids=ids).logits.float()
            out[method] = (ctx, result, captured[method], ids)
    return out


@pytest.fixture(scope="module")
def fresh(runs, tmp_path_factory):
    """method -> (logits, input-activation bits of one layer) from every folder loaded with plain transformers in ONE
    new Python process (no llmcompress, no llmcompressor import)."""
    tmp = tmp_path_factory.mktemp("fresh")
    folders = {m: str(ctx.current.path) for m, (ctx, *_rest) in runs.items()}
    torch.save(next(iter(runs.values()))[3], tmp / "ids.pt")
    code = (
        "import json, sys, torch\ntorch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        f"folders = json.loads({json.dumps(folders)!r}); ids = torch.load({str(tmp / 'ids.pt')!r})\n"
        "out, acts = {}, {}\n"
        "for name, path in folders.items():\n"
        "    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()\n"
        "    with torch.no_grad():\n        out[name] = m(input_ids=ids).logits\n"
        "    s = getattr(m.get_submodule('model.layers.0.mlp.up_proj'), 'quantization_scheme', None)\n"
        "    acts[name] = s.input_activations.num_bits if s is not None and s.input_activations else None\n"
        f"torch.save(out, {str(tmp / 'logits.pt')!r}); print('ACTS', json.dumps(acts))\n"
        "print('LLMCOMPRESSOR_IMPORTED', 'llmcompressor' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("ACTS", "LLMCOMP")))
    assert lines["LLMCOMPRESSOR_IMPORTED"] == "False"
    logits, acts = torch.load(tmp / "logits.pt"), json.loads(lines["ACTS"])
    return {m: (logits[m], acts[m]) for m in folders}


@pytest.mark.parametrize("method", list(STAGES))
def test_fresh_process_reload_gives_the_in_memory_logits(runs, fresh, method):
    ctx, _, here, ids = runs[method]
    there, _ = fresh[method]
    assert there.shape == here.shape == (1, ids.shape[1], 512)
    diff = (there.float() - here).abs().max().item()
    assert diff < 0.01, diff  # bf16 scales / bf16-stored weights vs the fp32 model in memory
    orig, _ = ctx.original.load()
    with torch.no_grad():  # the method did change the model (int8 W8A8 barely moves the tiny model's logits)
        assert (orig(input_ids=ids).logits - here).abs().max().item() > (1 if method == "llmc-w8a8" else 10) * diff


@pytest.mark.parametrize("method,fmt,act_bits", [
    ("llmc-gptq-w4a16", "pack-quantized", None), ("llmc-awq-w4a16", "pack-quantized", None),
    ("llmc-w8a8", "int-quantized", 8),
])
def test_quantize_saves_a_compressed_tensors_folder(runs, fresh, method, fmt, act_bits):
    from safetensors import safe_open

    ctx, result, _, _ = runs[method]
    data, folder = result.data, ctx.current.path
    assert (data["method"], data["format"], data["quantized_modules"], data["skipped_modules"]) == (
        method, "compressed-tensors", 14, ["lm_head"])
    assert data["compute"] == {"device": "cpu", "dtype": "float32", "threads": 1}  # calibrated in the runtime dtype
    assert data["calibration"]["tokens"] == 8 * 64 and "decompression" in data["runs_as"]
    assert data["reload_check"]["max_abs_logit_diff"] < 0.01
    assert ctx.current.meta["format"] == "compressed-tensors" and "llmcompressor" in ctx.current.meta["versions"]
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"], config["dtype"]) == (
        "compressed-tensors", fmt, ["lm_head"], "bfloat16")
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"]) == ((4, 32) if act_bits is None else (8, None))
    assert fresh[method][1] == act_bits  # W8A8 still quantizes activations after transformers decompresses
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == "BF16"  # not fp32 like the runtime
    assert dtypes["model.layers.0.mlp.up_proj.weight_scale"] == "BF16"
    packed = "weight_packed" if act_bits is None else "weight"
    assert dtypes[f"model.layers.0.mlp.up_proj.{packed}"] == ("I32" if act_bits is None else "I8")
    assert ctx.current.size_bytes < (0.6 if act_bits is None else 0.75) * ctx.original.size_bytes
    assert (ctx.stage_dir / "llmcompressor.log").stat().st_size > 0


def test_awq_and_smoothquant_mappings_resolve_for_llama(runs):
    """AWQ and SmoothQuant fold their scales into the RMSNorm weights before q/k/v and gate/up: changed norms prove
    llmcompressor found the llama mappings (an unresolved mapping is skipped with only a log line)."""
    for method in ("llmc-awq-w4a16", "llmc-w8a8"):
        ctx = runs[method][0]
        model, _ = ctx.current.load()
        orig, _ = ctx.original.load()
        for i in range(2):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                name = f"model.layers.{i}.{norm}.weight"
                assert not torch.equal(model.get_parameter(name), orig.get_parameter(name)), (method, name)
    gptq, _ = runs["llmc-gptq-w4a16"][0].current.load()
    assert torch.equal(gptq.model.layers[0].input_layernorm.weight, orig.model.layers[0].input_layernorm.weight)


@pytest.mark.parametrize("method", ["sparsegpt", "llmc-wanda"])
def test_prune_reports_the_achieved_sparsity_and_saves_dense(runs, method):
    ctx, result, _, _ = runs[method]
    data = result.data
    assert data["requested_sparsity"] == 0.5 and data["modifier"] in ("SparseGPTModifier", "WandaPruningModifier")
    stats = data["sparsity"]
    assert stats["pruned_modules"] == 14 and stats["pruned_layers"] == pytest.approx(0.5, abs=1e-3)
    assert set(stats["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert data.get("pattern_holds", True) is True and (method != "sparsegpt" or data["pattern"] == "2:4")
    assert ctx.current.meta["format"] == "hf" and ctx.current.meta["method"] == method
    config = json.loads((ctx.current.path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert not (ctx.current.path / "recipe.yaml").exists()


def test_sparsegpt_updates_the_weights_it_keeps_and_wanda_does_not(runs):
    orig, _ = runs["sparsegpt"][0].original.load()
    for method, updates in (("sparsegpt", True), ("llmc-wanda", False)):
        model, _ = runs[method][0].current.load()
        w, w0 = model.model.layers[1].mlp.down_proj.weight, orig.model.layers[1].mlp.down_proj.weight
        kept = w != 0
        assert torch.equal(w[kept], w0[kept]) is not updates, method


# --- settings rejected before heavy work -------------------------------------------------------------------------


@pytest.mark.parametrize("stage,message", [
    ({"method": "llmc-gptq-w4a16", "bits": 3}, r"`bits`: must be 4 or 8"),
    ({"method": "llmc-awq-w4a16", "group_size": 0}, r"`group_size`: must be a positive divisor"),
    ({"method": "llmc-w8a8", "smoothing_strength": 1.5}, r"`smoothing_strength`: Input should be less than 1"),
    ({"method": "llmc-gptq-w4a16", "actorder": "dynamic"}, r"`actorder`: Input should be 'static', 'group' or "),
])
def test_bad_values_rejected_when_the_recipe_loads(stage, message):
    from llmcompress.recipe import load_recipe

    with pytest.raises(RecipeError, match=rf"stages\[0\] \(quantize\): {message}"):
        load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [{"type": "quantize", **stage}]})


@pytest.mark.parametrize("stage,message", [
    ({"type": "quantize", "method": "llmc-gptq-w4a16", "group_size": 48},
     r"group_size 48 does not divide the input width 64 of `model\.layers\.0\.self_attn\.q_proj` \(\d+ layers "
     r"affected\)\. Fix: use a divisor of 64, 128 such as 32 or 64, or -1"),
    ({"type": "quantize", "method": "llmc-awq-w4a16", "skip": ["lm_head", "model.*"]},
     r"`skip` leaves no linear layer to quantize"),
    ({"type": "quantize", "method": "llmc-w8a8", "calibration": {"source": "missing/calib.txt"}},
     r"no such file `.*missing/calib\.txt`"),
    ({"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "skip": []},
     r"sparsegpt prunes only layers inside the decoder blocks \(`model\.layers\.\*`\), not `lm_head`\. "
     r"Fix: add `lm_head` to `skip`"),
])
def test_bad_settings_fail_before_compressing(make_ctx, stage, message):
    ctx = make_ctx(stages=[stage])
    with pytest.raises(RecipeError, match=message):
        ctx.recipe.stages[0].run(ctx)
    assert not (ctx.stage_dir / "model").exists() and not (ctx.stage_dir / "llmcompressor.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without an FP8-capable GPU")
def test_fp8_fails_at_preflight_without_a_capable_gpu():
    from llmcompress.pipeline import preflight
    from llmcompress.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "smollm2-llmc-fp8.yaml")
    with pytest.raises(RecipeError, match=(
            r"smollm2-llmc-fp8\.yaml: stages\[0\] \(quantize:llmc-fp8\): `llmc-fp8` \(FP8 weights and activations\) "
            r"needs a CUDA GPU with compute capability >= 8\.9 .* there is no CUDA GPU here\. "
            r"Fix: use `llmc-w8a8` or `torchao-int8dq` on CPU")):
        preflight(recipe)


def test_smoothquant_can_be_switched_off():
    from llmcompress.quant.llmcompressor import LlmcW8A8Config

    assert [type(m).__name__ for m in LlmcW8A8Config().modifiers(["lm_head"])] == [
        "SmoothQuantModifier", "GPTQModifier"]
    assert [type(m).__name__ for m in LlmcW8A8Config(smoothing_strength=None).modifiers([])] == ["GPTQModifier"]
