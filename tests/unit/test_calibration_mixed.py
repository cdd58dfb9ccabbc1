"""builtin:mixed calibration on the tiny model: documented shares, chat template markers, determinism, the cache,
builtin:pydoc unchanged, a clear error without a model, and seed prompts that stay out of the evaluation sets."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmcompress.data import CalibrationConfig, load_calibration, read_calibration_texts
from llmcompress.data import mixed, selfgen
from llmcompress.errors import LLMCompressError, RecipeError

#: 4 documentation, 3 chat and 3 generated windows. 512 tokens: longer than the tiny random model's longest answer
#: re-tokenized (~310 tokens), so every chat window holds a turn marker.
CFG = CalibrationConfig(samples=10, seq_len=512)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def handle(tiny_model_dir):
    from llmcompress.context import ModelHandle, Runtime

    return ModelHandle("original", tiny_model_dir, Runtime(device="cpu", threads=1, dtype="bfloat16", seed=0))


@pytest.fixture(scope="module")
def mixed_ids(tokenizer, handle):
    """The mixed windows for CFG, generated once into this session's cache."""
    ids = load_calibration(CFG, tokenizer, model=handle)
    assert handle._loaded is None  # loaded for the generation only, released afterwards
    return ids


_OLD: dict[str, list[int]] = {}


def _old_load_pydoc(cfg: CalibrationConfig, tokenizer) -> torch.Tensor:
    """load_calibration for builtin:pydoc as it was before builtin:mixed (frozen copy)."""
    if "stream" not in _OLD:
        from pydoc_data.topics import topics

        docs = [d for d in (topics[k] for k in sorted(topics)) if d.strip()]
        _OLD["stream"] = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    ids = _OLD["stream"][cfg.skip_tokens:]
    windows = len(ids) // cfg.seq_len
    picked = sorted(random.Random(cfg.seed).sample(range(windows), cfg.samples))
    return torch.tensor(ids[: windows * cfg.seq_len], dtype=torch.long).view(windows, cfg.seq_len)[picked]


def test_mixed_is_the_default_and_a_misspelling_is_caught():
    from llmcompress.recipe import load_recipe

    assert CalibrationConfig().source == "builtin:mixed"
    stage = {"type": "quantize", "method": "gptq", "calibration": {"source": "builtin:mixd"}}
    with pytest.raises(RecipeError, match=r"unknown source `builtin:mixd`\. Did you mean `builtin:mixed`\?"):
        load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [stage]})


@pytest.mark.parametrize("samples,expected", [(16, (6, 5, 5)), (10, (4, 3, 3)), (64, (26, 19, 19)), (1, (1, 0, 0)),
                                              (2, (1, 1, 0))])
def test_mix_counts_follow_the_documented_shares(samples, expected):
    assert tuple(mixed.mix_counts(samples).values()) == expected
    assert list(mixed.SHARES) == ["documentation", "chat", "generated"]
    assert mixed.SHARES == {"documentation": 0.4, "chat": 0.3, "generated": 0.3}  # as the module docstring says


def test_mix_counts_add_up_and_stay_within_one_of_the_share():
    for n in range(1, 300):
        counts = mixed.mix_counts(n)
        assert sum(counts.values()) == n
        assert all(abs(counts[d] - share * n) < 1 for d, share in mixed.SHARES.items())


def test_mixed_windows_are_docs_then_chats_then_prose(mixed_ids, tokenizer):
    assert mixed_ids.shape == (CFG.samples, CFG.seq_len) and mixed_ids.dtype == torch.long
    docs, chat, prose = mixed_ids[:4], mixed_ids[4:7], mixed_ids[7:]
    pydoc = CFG.model_copy(update={"source": "builtin:pydoc", "samples": 4})
    assert torch.equal(docs, _old_load_pydoc(pydoc, tokenizer))  # drawn exactly as builtin:pydoc draws them
    markers = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert all(markers & set(row.tolist()) for row in chat)  # rendered with the chat template
    assert not any(markers & set(row.tolist()) for row in prose)
    first_chat = tokenizer.decode(chat[0])
    assert first_chat.startswith("<|im_start|>user\n")
    assert any(first_chat.startswith(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")
               for p in mixed.chat_prompts())
    assert any(tokenizer.decode(prose[0]).startswith(s) for s in mixed.prose_seeds())


def test_deterministic_for_a_seed_even_without_the_cache(mixed_ids, tokenizer, handle, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_CACHE", str(tmp_path))  # an empty cache: everything generated again
    assert torch.equal(load_calibration(CFG, tokenizer, model=handle), mixed_ids)
    other = load_calibration(CFG.model_copy(update={"seed": 1}), tokenizer, model=handle)
    for rows in (slice(0, 4), slice(4, 7), slice(7, 10)):  # every domain depends on the seed
        assert not torch.equal(other[rows], mixed_ids[rows])


def test_second_run_reads_the_cache_and_generates_nothing(mixed_ids, tokenizer, handle, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated although the text is cached")

    monkeypatch.setattr(selfgen, "generate", no_generation)
    monkeypatch.setattr(type(handle), "load", no_generation)
    assert torch.equal(load_calibration(CFG, tokenizer, model=handle), mixed_ids)
    # fewer, shorter windows: a prefix of the same cached text
    small = load_calibration(CFG.model_copy(update={"samples": 5, "seq_len": 64}), tokenizer, model=handle)
    assert small.shape == (5, 64)


def test_a_loaded_model_works_too_and_is_keyed_by_its_weights(tokenizer, handle):
    model, _ = handle.load()
    try:
        cfg = CalibrationConfig(samples=3, seq_len=64)  # one window per domain
        ids = load_calibration(cfg, tokenizer, model=model)
        assert ids.shape == (3, 64)
        assert torch.equal(ids, load_calibration(cfg, tokenizer, model=model))
        assert selfgen.weights_hash(model) == selfgen.weights_hash(model)
    finally:
        handle.release()


def test_pydoc_windows_are_as_before(tokenizer, handle):
    default = CalibrationConfig(source="builtin:pydoc")
    assert torch.equal(load_calibration(default, tokenizer), _old_load_pydoc(default, tokenizer))
    big = CalibrationConfig(source="builtin:pydoc", samples=32, seq_len=512, skip_tokens=20000, seed=3)
    assert torch.equal(load_calibration(big, tokenizer, model=handle), _old_load_pydoc(big, tokenizer))  # model unused


def test_mixed_without_a_model_is_a_clear_error(tokenizer):
    message = r"`builtin:mixed` has the original model write 60% of its text .* got no `model`\. Fix: pass `model=`"
    with pytest.raises(LLMCompressError, match=message + r" .* or set `source: builtin:pydoc`"):
        load_calibration(CalibrationConfig(samples=4, seq_len=16), tokenizer)
    with pytest.raises(LLMCompressError, match=r"Fix: use load_calibration\(cfg, tokenizer, model=\.\.\.\)"):
        read_calibration_texts(CalibrationConfig())
    with pytest.raises(LLMCompressError, match=r"`model` must be the run's ModelHandle .* got str"):
        load_calibration(CalibrationConfig(samples=4, seq_len=16), tokenizer, model="smollm2-135m")


def test_record_gives_tokens_per_domain():
    rec = CalibrationConfig().record()
    assert rec["source"] == "builtin:mixed" and rec["tokens"] == 16 * 256
    assert {d: v["tokens"] for d, v in rec["domains"].items()} == {"documentation": 6 * 256, "chat": 5 * 256,
                                                                   "generated": 5 * 256}
    assert rec["domains"]["chat"]["temperature"] == 0.7 and rec["domains"]["generated"]["temperature"] == 1.0
    assert "domains" not in CalibrationConfig(source="builtin:pydoc").record()


def _eval_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _eval_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _eval_strings(v)]
    return []


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_seed_prompts_are_open_ended_and_stay_out_of_the_chat_eval_set():
    prompts, seeds = mixed.chat_prompts(), mixed.prose_seeds()
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert len(seeds) >= 30 and len(set(seeds)) == len(seeds)
    # instructions, not factual questions: each starts with a verb that asks for writing, not "What is ..."
    assert not any(p.lower().startswith(("what ", "who ", "when ", "where ", "how many ", "repeat")) for p in prompts)
    from llmcompress.evals import path as evals_path

    evals = evals_path() / "chat"
    texts = []
    assert sorted(evals.glob("*.jsonl")), evals
    for path in sorted(evals.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += [_norm(s) for s in _eval_strings(json.loads(line))]
    for p in prompts + seeds:
        assert not any(_norm(p) in t or (len(t) > 20 and t in _norm(p)) for t in texts), p
