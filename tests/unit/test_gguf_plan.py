"""The measured mixed-precision plan of `method: gguf` (`target_bits`): allocation, row matching, Fisher, arguments."""

from __future__ import annotations

import numpy as np
import pytest

import llmcompress.quant  # noqa: F401 - the registry first (as a recipe load does)
from llmcompress.errors import LLMCompressError
from llmcompress.llamacpp import plan


def _table():
    # two tensors: "a" is sensitive (its cost falls a lot with bytes), "b" is not
    return {
        "blk.0.a.weight": {"q4_0": {"bytes": 100, "cost": 10.0}, "q8_0": {"bytes": 200, "cost": 1.0}},
        "blk.0.b.weight": {"q4_0": {"bytes": 100, "cost": 1.0}, "q8_0": {"bytes": 200, "cost": 0.9}},
        "token_embd.weight": {"q5_0": {"bytes": 50, "cost": 2.0}, "q8_0": {"bytes": 80, "cost": 0.1}},
    }


def test_allocation_spends_the_budget_where_it_buys_the_most():
    t = _table()
    assert plan.allocate(t, 250, 1000) == {"blk.0.a.weight": "q4_0", "blk.0.b.weight": "q4_0",
                                             "token_embd.weight": "q5_0"}
    # 100 more bytes: the sensitive tensor gets them, not the insensitive one
    chosen = plan.allocate(t, 350, 1000)
    assert chosen["blk.0.a.weight"] == "q8_0" and chosen["blk.0.b.weight"] == "q4_0"
    assert plan.allocate(t, 10_000, 1000) == {n: "q8_0" for n in t}
    for budget in (250, 300, 350, 400, 480):  # never over budget
        assert sum(t[n][k]["bytes"] for n, k in plan.allocate(t, budget, 1000).items()) <= budget


def test_a_budget_below_the_smallest_types_names_the_fix():
    with pytest.raises(LLMCompressError, match="raise `target_bits`"):
        plan.allocate(_table(), 200, 1000)


def test_summary_counts_types_per_kind_and_bits_per_weight():
    t = _table()
    s = plan.summary({"blk.0.a.weight": "q8_0", "blk.0.b.weight": "q4_0", "token_embd.weight": "q5_0"}, t, 350)
    assert s["types"] == {"a": {"q8_0": 1}, "b": {"q4_0": 1}, "token_embd": {"q5_0": 1}}
    assert s["bytes"] == 350 and s["bits_per_weight"] == 8.0 and s["estimated_cost"] == pytest.approx(4.0)


def test_type_file_anchors_names_and_keeps_the_embedding_apart(tmp_path):
    path, emb = plan.type_file({"blk.1.attn_q.weight": "q5_1", "token_embd.weight": "q8_0"}, tmp_path / "t.txt")
    assert emb == "q8_0"
    assert path.read_text() == "^blk\\.1\\.attn_q\\.weight$=q5_1\n"


def test_pure_args_name_only_the_tensors_a_k_quant_fits(tmp_path):
    w = {"blk.0.ffn_down.weight": np.zeros((576, 1536)), "blk.0.attn_q.weight": np.zeros((576, 576)),
         "token_embd.weight": np.zeros((49152, 576))}
    assert plan.pure_args("q5_1", w, tmp_path) == (["--pure", "--token-embedding-type", "q5_1"], "Q5_1")
    args, ftype = plan.pure_args("q4_k", w, tmp_path)
    assert ftype == "Q8_0" and args[-2:] == ["--token-embedding-type", "q8_0"]
    assert (tmp_path / "plan-q4_k.txt").read_text() == "^blk\\.0\\.ffn_down\\.weight$=q4_k\n"
    assert plan.pure_args("q4_k", {"x.weight": np.zeros((4, 576))}, tmp_path) is None


def test_fisher_follows_rows_the_converter_permuted():
    rng = np.random.default_rng(0)
    src = {"model.q.weight": rng.standard_normal((8, 32)).astype(np.float32),
           "model.o.weight": rng.standard_normal((8, 32)).astype(np.float32)}
    fish = {n: rng.random((8, 32)).astype(np.float32) for n in src}
    perm = np.array([1, 0, 3, 2, 5, 4, 7, 6])
    gguf_w = {"blk.0.attn_q.weight": src["model.q.weight"][perm], "blk.0.attn_output.weight": src["model.o.weight"]}
    out = plan.map_fisher(fish, src, gguf_w)
    np.testing.assert_array_equal(out["blk.0.attn_q.weight"], fish["model.q.weight"][perm])
    np.testing.assert_array_equal(out["blk.0.attn_output.weight"], fish["model.o.weight"])
    with pytest.raises(LLMCompressError, match="matches no parameter"):
        plan.map_fisher(fish, src, {"blk.0.x.weight": gguf_w["blk.0.attn_q.weight"] + 1})


def test_fisher_is_positive_per_parameter_and_leaves_the_model_as_it_was(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    ticks = []
    f = plan.fisher(model, torch.randint(0, model.config.vocab_size, (2, 16)), ticks.append)
    assert len(ticks) == 2
    params = dict(model.named_parameters())
    assert f and all(f[n].shape == tuple(params[n].shape) and (f[n] >= 0).all() for n in f)
    assert sum(float(v.sum()) for v in f.values()) > 0
    assert not any(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_target_bits_config():
    from llmcompress.llamacpp.quant import GGUFConfig

    cfg = GGUFConfig(target_bits=6.15, plan_types=["Q5_1", "q8_0"])
    assert cfg.plan_types == ["q5_1", "q8_0"] and cfg.bits_per_weight() == 6.15
    assert GGUFConfig().bits_per_weight() == 4.58
    for bad, msg in (({"target_bits": 5, "plan_types": ["q9_k"]}, "q9_k"),
                     ({"plan_samples": 4}, "apply to `target_bits` only"),
                     ({"target_bits": 5, "tensor_types": {"attn_v": "q8_0"}}, "use one of them")):
        with pytest.raises(ValueError, match=msg):
            GGUFConfig(**bad)
