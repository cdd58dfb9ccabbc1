"""A tiny random llama (a few hundred KB) built from a config, for tests and dry runs. No download needed.

Its tokenizer is a byte-level BPE trained on Python's own reference text (`pydoc_data.topics`), so text round-trips.
"""

from __future__ import annotations

from pathlib import Path

from ..utils.cache import cache_dir
from ..utils.io import atomic_write_json, cached_folder

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VERSION = 2  # bump when the architecture or tokenizer below changes (2: head_dim 32, which vLLM CPU supports)


def corpus_text() -> str:
    """Python's reference documentation as one text (~1 MB of real English, on every Python install)."""
    from ..data.corpora import builtin_text

    return builtin_text("pydoc")


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = corpus_text()
    tok.train_from_iterator((text[i : i + 10_000] for i in range(0, len(text), 10_000)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(path: Path, hidden: int = 64, layers: int = 2, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a random llama with a trained tokenizer to ``path`` (``save_pretrained`` layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    meta = {"format": "hf", "role": "original", "source": "tiny-random-llama"}
    atomic_write_json(Path(path) / "llmcompress.json", meta)
    return Path(path)


def tiny_random_llama() -> Path:
    """Cached tiny random llama folder (hidden 64, 2 layers, 2 heads of 32 + 1 KV head, vocab 512)."""
    return cached_folder(cache_dir("models", f"tiny-random-llama-v{VERSION}"), build_tiny_llama)
