"""Structural pruning of language models (``width``, ``depth``): the shapes planned from config.json, the pieces
removed (the least important ones), and folders that plain transformers loads in a fresh process as the model the
run computed with."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from llmcompress.errors import RecipeError
from llmcompress.prune.depth import DepthConfig
from llmcompress.prune.shrink import Shape
from llmcompress.prune.width import WidthConfig

CAL = {"source": "builtin:pydoc", "samples": 4, "seq_len": 64}


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    """A random llama with grouped-query attention: 6 query heads over 2 KV heads, 4 layers, untied output."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmcompress.models import MODELS

    tiny = MODELS.get("tiny-random-llama")()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, num_hidden_layers=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gqa")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(n=4, length=32, seed=0):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _fresh_process_logits(path, ids) -> torch.Tensor:
    """Logits of plain ``AutoModelForCausalLM.from_pretrained(path)`` in a new Python process."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(path)!r}, dtype=torch.float32).eval()
        ids = torch.tensor(json.loads(sys.stdin.read()))
        with torch.no_grad():
            print(json.dumps(m(input_ids=ids).logits.tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids.tolist()), capture_output=True,
                         text=True, check=True, timeout=300)
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


def _shrink_and_save(cfg, path, out_dir):
    from transformers import AutoTokenizer

    from llmcompress.models.loading import save_model

    model = _load(path)
    shape = Shape.of_config(json.loads((path / "config.json").read_text()))
    new = cfg.plan(shape)
    info = cfg.shrink_(model, _ids(8, 32, seed=1), shape, new, None)
    save_model(model, AutoTokenizer.from_pretrained(path), out_dir, {"method": cfg.method}, storage_dtype="float32")
    return model, new, info


# --- planning from config.json ---------------------------------------------------------------------------------------


def test_width_target_solves_the_mlp_width_and_counts_parameters_exactly(gqa_model):
    shape = Shape.of_config(json.loads((gqa_model / "config.json").read_text()))
    assert shape.params() == sum(p.numel() for p in _load(gqa_model).parameters())
    new = WidthConfig(target=0.2, multiple_of=8).plan(shape)
    assert new.intermediate < shape.intermediate and new.intermediate % 8 == 0
    assert new.params() <= 0.8 * shape.params() < Shape(**{**new.__dict__, "intermediate": new.intermediate + 8}
                                                         ).params()  # the largest width that removes 20%


@pytest.mark.parametrize("kw, fragment", [
    ({"heads": 5}, "do not divide into the 2 KV groups"),
    ({"kv_heads": 3}, "more than the model's 2"),
    ({"heads": 8}, "at most 6 heads"),
    ({"intermediate_size": 96}, "nothing would be removed"),
    ({"target": 0.9}, "the rest of the model alone holds"),
])
def test_width_plans_that_cannot_work_are_refused_with_the_fix(gqa_model, kw, fragment):
    shape = Shape.of_config(json.loads((gqa_model / "config.json").read_text()))
    with pytest.raises(RecipeError, match="Fix") as e:
        WidthConfig(multiple_of=8, **kw).plan(shape)
    assert fragment in str(e.value)


def test_depth_cut_deeper_than_the_model_is_refused(gqa_model):
    shape = Shape.of_config(json.loads((gqa_model / "config.json").read_text()))
    with pytest.raises(RecipeError, match="every decoder layer"):
        DepthConfig(layers=4).plan(shape)
    new = DepthConfig(target=0.2).plan(shape)  # whole layers, rounded up: 1 layer removes 15.5% here, 2 remove 31%
    assert new.params() <= 0.8 * shape.params() < Shape(**{**new.__dict__, "layers": new.layers + 1}).params()


# --- the cut ---------------------------------------------------------------------------------------------------------


def test_width_heads_mlp_and_hidden_cut_loads_in_plain_transformers_as_computed(gqa_model, tmp_path):
    cfg = WidthConfig(intermediate_size=64, heads=4, hidden_size=40, calibration=CAL)
    model, new, info = _shrink_and_save(cfg, gqa_model, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert (conf["intermediate_size"], conf["num_attention_heads"], conf["num_key_value_heads"], conf["hidden_size"],
            conf["head_dim"]) == (64, 4, 2, 40, 8)
    assert sum(p.numel() for p in model.parameters()) == new.params()
    for heads in info["heads_kept"]:  # two query heads kept in each KV group of three
        assert sorted(h // 3 for h in heads) == [0, 0, 1, 1]
    ids = _ids(2, 16, seed=3)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(_fresh_process_logits(tmp_path, ids), expected, atol=1e-5)


def test_width_removes_the_channels_that_contribute_least(gqa_model):
    from llmcompress.prune.width import importance

    model = _load(gqa_model)
    down = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight[:, :10] = 0  # channels 0-9 of layer 1 write nothing
    shape = Shape.of_config(json.loads((gqa_model / "config.json").read_text()))
    scores = importance(model, _ids(4, 32), shape, "contribution")
    assert (scores["mlp"][1][:10] == 0).all() and (scores["mlp"][1][10:] > 0).all()
    WidthConfig(intermediate_size=86).shrink_(model, _ids(4, 32), shape, Shape(**{**shape.__dict__,
                                              "intermediate": 86}), None)
    assert model.model.layers[1].mlp.down_proj.weight.abs().sum(0).min() > 0  # the ten silent channels went


def test_depth_keeps_the_most_influential_layers_and_generates_like_the_reload(gqa_model, tmp_path):
    cfg = DepthConfig(layers=2, calibration=CAL)
    model, new, info = _shrink_and_save(cfg, gqa_model, tmp_path)
    bi = info["block_influence"]
    assert sorted(info["layers_removed"]) == sorted(sorted(range(4), key=lambda i: bi[i])[:2])
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]  # the KV cache's index
    ids = _ids(1, 8, seed=5)
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=6, do_sample=False)
        b = _load(tmp_path).generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(_fresh_process_logits(tmp_path, ids), expected, atol=1e-5)


def test_depth_by_perplexity_removes_the_layers_whose_absence_costs_least(gqa_model):
    """Greedy by loss: the first layer removed is the one whose absence alone gives the lowest loss (checked against
    each single removal measured here), the second the best given the first; the model keeps its other layers."""
    ids = _ids(8, 32, seed=1)

    def loss_without(gone):
        m = _load(gqa_model)
        m.model.layers = torch.nn.ModuleList([x for i, x in enumerate(m.model.layers) if i not in gone])
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    first = min(range(4), key=lambda i: loss_without({i}))
    second = min((i for i in range(4) if i != first), key=lambda i: loss_without({first, i}))
    model = _load(gqa_model)
    shape = Shape.of_config(json.loads((gqa_model / "config.json").read_text()))
    cfg = DepthConfig(layers=2, importance="perplexity", calibration=CAL)
    info = cfg.shrink_(model, ids, shape, cfg.plan(shape), None)
    assert info["layers_removed"] == sorted([first, second])
    assert info["loss_after_each_removal"] == pytest.approx([loss_without({first}), loss_without({first, second})],
                                                            rel=1e-4)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2


def test_a_recipe_run_writes_a_smaller_plain_checkpoint(make_ctx):
    ctx = make_ctx(stages=[{"type": "prune", "method": "width", "target": 0.2, "multiple_of": 8,
                            "calibration": CAL}])
    result = ctx.recipe.stages[0].run(ctx)
    assert result.data["params_removed"] >= 0.2
    assert result.data["params_after"] == Shape(**result.data["shape_after"]).params()
    assert ctx.current.size_bytes < ctx.original.size_bytes
    assert "plain transformers" in json.loads((ctx.current.path / "llmcompress.json").read_text())["note"]


def test_a_list_of_calibration_sources_is_used_together(make_ctx):
    """``calibration`` takes several sources with one seq_len: their windows rank the pieces together, and the
    result records each source."""
    ctx = make_ctx(stages=[{"type": "prune", "method": "width", "target": 0.2, "multiple_of": 8,
                            "calibration": [CAL, {**CAL, "source": "builtin:pysource", "samples": 3}]}])
    data = ctx.recipe.stages[0].run(ctx).data
    assert [(c["source"], c["tokens"]) for c in data["calibration"]] == [("builtin:pydoc", 4 * 64),
                                                                         ("builtin:pysource", 3 * 64)]


def test_depth_by_perplexity_keeps_each_layers_own_mask_when_attention_types_mix():
    """A Qwen2 with full and sliding-window layers (a window of 8 on 32-token windows): each candidate's loss is that
    of the model without the layer, every kept layer run with the mask of its own type (computed here layer by layer,
    not through the model's forward), not with the mask of whichever layer stood at its index before."""
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmcompress.models.walk import call_layer, first_layer_inputs, layer_types
    from llmcompress.prune.depth import greedy_by_loss

    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, layer_types=types, sliding_window=8,
        use_sliding_window=True)).eval()
    ids = torch.randint(0, 128, (8, 32))
    layers = list(model.model.layers)
    ((hidden, kwargs),) = first_layer_inputs(model, layers, ids)

    def loss_without(gone: int) -> float:
        h = hidden
        with torch.no_grad():
            for i, kind in enumerate(layer_types(model, layers)):
                if i != gone:
                    h = call_layer(layers[i], h, kwargs[kind])
            logits = model.lm_head(model.model.norm(h))
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)))

    expected = {i: loss_without(i) for i in range(4)}
    drop, losses = greedy_by_loss(model, ids, 1)
    assert drop == [min(expected, key=expected.__getitem__)]
    assert losses[0] == pytest.approx(min(expected.values()), rel=1e-4)
    assert model.config.layer_types == types and len(model.model.layers) == 4  # the model is handed back whole
