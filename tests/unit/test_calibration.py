"""Calibration data: every source kind, deterministic windows, and errors that name the file and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from llmcompress.data import CalibrationConfig, check_calibration, load_calibration, read_calibration_texts, to_records
from llmcompress.errors import RecipeError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _cfg(**kw) -> CalibrationConfig:
    return CalibrationConfig(**{"samples": 4, "seq_len": 16, "skip_tokens": 0, **kw})


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_builtin_windows_are_distinct_deterministic_and_from_the_stream(tokenizer):
    from llmcompress.models.tiny import corpus_text

    cfg = CalibrationConfig(source="builtin:pydoc", samples=8, seq_len=32)  # the default is builtin:mixed
    ids = load_calibration(cfg, tokenizer)
    assert ids.shape == (8, 32) and ids.dtype == torch.long
    assert torch.equal(ids, load_calibration(cfg, tokenizer))  # same seed, same windows
    assert not torch.equal(ids, load_calibration(cfg.model_copy(update={"seed": 1}), tokenizer))
    stream = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"][cfg.skip_tokens:]
    windows = {tuple(stream[i : i + 32]) for i in range(0, len(stream) - 31, 32)}
    assert all(tuple(row.tolist()) in windows for row in ids)  # aligned, non-overlapping windows after skip_tokens
    assert len({tuple(r.tolist()) for r in ids}) == 8


def test_txt_file_relative_to_the_recipe_folder(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ids = load_calibration(_cfg(source="data/c.txt"), tokenizer, base_dir=tmp_path)
    assert ids.shape == (4, 16)
    assert "fox" in tokenizer.decode(ids.flatten())


def test_jsonl_text_rows(tmp_path, tokenizer):
    _jsonl(tmp_path / "c.jsonl", [{"text": f"Row {i} says something about the weather today."} for i in range(30)])
    docs = read_calibration_texts(_cfg(source="c.jsonl"), tmp_path)
    assert len(docs) == 30 and docs[3].startswith("Row 3 ")
    assert load_calibration(_cfg(source="c.jsonl"), tokenizer, tmp_path).shape == (4, 16)


def test_jsonl_chat_rows_use_the_chat_template(tmp_path, tokenizer):
    _jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
        {"prompt": "What is a dict?", "response": "A mapping."},
    ])
    templated = read_calibration_texts(_cfg(source="c.jsonl"), tmp_path, tokenizer)
    assert templated[0] == "<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\nA sequence.<|im_end|>\n"
    assert templated[1] == "<|im_start|>user\nWhat is a dict?<|im_end|>\n<|im_start|>assistant\nA mapping.<|im_end|>\n"
    plain = read_calibration_texts(_cfg(source="c.jsonl"), tmp_path, tokenizer=None)  # no template: role lines
    assert plain[1] == "user: What is a dict?\nassistant: A mapping."


def test_bad_jsonl_rows_name_the_line_and_the_fix(tmp_path):
    _jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"body": "no known field"}])
    with pytest.raises(RecipeError, match=r"c\.jsonl:2: no `text`, `messages` or `prompt` \+ `response` "
                                          r"\(got `body`\)\. Fix: write lines like"):
        read_calibration_texts(_cfg(source="c.jsonl"), tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(RecipeError, match=r"d\.jsonl:2: not valid JSON .* Fix: one JSON object per line"):
        read_calibration_texts(_cfg(source="d.jsonl"), tmp_path)


def test_missing_and_empty_files_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(RecipeError, match=rf"no such file `{tmp_path}/nope\.txt`\. Fix: check the path"):
        check_calibration(_cfg(source="nope.txt"), tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(RecipeError, match=r"`.*empty\.txt` is empty\. Fix"):
        load_calibration(_cfg(source="empty.txt"), tokenizer, tmp_path)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(RecipeError, match=r"blank\.jsonl` has no text\. Fix"):
        load_calibration(_cfg(source="blank.jsonl"), tokenizer, tmp_path)


def test_relative_path_is_left_for_later_without_a_base_dir():
    check_calibration(_cfg(source="not/here.txt"), None)  # the recipe's folder is not known yet: no verdict
    with pytest.raises(RecipeError, match="no such file"):
        check_calibration(_cfg(source="/not/here.txt"), None)


def test_too_few_tokens_says_how_many_and_the_fix(tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("Only a few words here.")
    with pytest.raises(RecipeError, match=r"short\.txt` has \d+ tokens after skip_tokens=0, which make 0 windows of "
                                          r"seq_len 16, but samples=4 needs 64 tokens\. Fix: add text, or lower"):
        load_calibration(_cfg(source="short.txt"), tokenizer, tmp_path)


def test_hf_source_offline_fails_at_once(monkeypatch):
    import llmcompress.utils.net as net

    monkeypatch.setattr(net, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(RecipeError, match=r"`hf:allenai/c4:en` needs the Hugging Face hub, which is not reachable.*"
                                          r"Fix: use `builtin:pydoc` or a local"):
        read_calibration_texts(_cfg(source="hf:allenai/c4:en"))


@pytest.mark.parametrize("source,message", [
    ("builtin:pydocs", r"unknown source `builtin:pydocs`\. Did you mean `builtin:pydoc`\?"),
    ("data.csv",
     r"source `data\.csv` must be `builtin:pydoc`, a \.txt file, a \.jsonl file or `hf:<dataset>\[:<config>\]`"),
    ("hf:", r"`hf:` is not `hf:<dataset>` or `hf:<dataset>:<config>`"),
    ("hf:c4:", r"`hf:c4:` is not `hf:<dataset>` or `hf:<dataset>:<config>`"),
])
def test_bad_sources_rejected_when_the_recipe_loads(source, message):
    from llmcompress.recipe import load_recipe

    stage = {"type": "quantize", "method": "gptq", "calibration": {"source": source}}
    with pytest.raises(RecipeError, match=rf"stages\[0\] \(quantize\): `calibration\.source`: {message}"):
        load_recipe({"name": "x", "model": "tiny-random-llama", "stages": [stage]})


def test_to_records():
    recs = to_records(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    assert recs == [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]},
                    {"input_ids": [8, 9, 10], "attention_mask": [1, 1, 1]}]
