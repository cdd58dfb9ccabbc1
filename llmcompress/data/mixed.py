"""``builtin:mixed``, the default calibration source: documentation, chat turns and the original model's own prose.

GPTQ calibrated on Python's docs alone lost +7.0% perplexity on Python's docs but +14.7% on Shakespeare: calibration
on one domain fits that domain. The mix, by share of the ``samples`` windows (largest-remainder rounding, in this
order in the returned tensor):

- 40% ``documentation``: windows of ``builtin:pydoc`` after ``skip_tokens``, drawn exactly as ``builtin:pydoc``
  draws them. The only human-written part, and the only one with code; the biggest share so that a mixed
  calibration stays close to the pydoc one on technical text.
- 30% ``chat``: the original model answers open-ended instructions (``chat_seed_prompts.txt``: explain, summarise,
  write a story / poem / email, advise, list, compare; never short factual questions, which the evaluation sets
  ask) at temperature 0.7, top-p 0.95, up to 192 new tokens; prompt + answer are rendered with the tokenizer's chat
  template, as the model sees chats when it serves them.
- 30% ``generated``: the original model continues short prose openings (``prose_seeds.txt``: "Once upon a time",
  "Dear friend,", ...) at temperature 1.0, top-p 0.95, up to 192 new tokens: everyday English of many registers,
  from the model's own distribution (the data-free calibration of LLM-QAT, Liu et al., 2023).

Each domain's texts are joined (chats back to back, prose by blank lines), tokenized and cut into consecutive
windows of ``seq_len``; the longest stretch of a chat without a turn marker is one answer (<= 192 tokens), so every
chat window of 256 tokens or more holds one. Prompts and seeds are shuffled by ``seed``, and each generation batch is
seeded from it, so the text is deterministic for a model, a seed and the libraries' versions.

Cost: the generated text is cached (``selfgen.py``), so only the first run with a model and seed pays. Measured on
smollm2-135m, bf16, 1 torch thread, a 2-core CPU shared with other jobs (load ~5), batches of 8 at ~20-30 new
tokens/s: 16 x 256 (the default; 1 chat + 2 prose batches, ~3.8k new tokens) 127 s the first time, 0.4 s after;
64 x 512 (7 + 8 batches, ~18k new tokens) 812 s the first time, 0.6 s after.

Measured (docs/calibration.md, GPTQ W4 g64, 32 x 512, two seeds): the in-domain vs out-of-domain gap shrinks from
~12.5 to ~4 perplexity points (Python's docs vs Shakespeare), but mostly because the docs lose ~6.5 points
(+11% -> +18%) while Shakespeare gains ~2 (+24% -> +22%).
"""

from __future__ import annotations

import random
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LLMCompressError
from ..utils.io import stable_hash
from .selfgen import Sampling, Writer, generated_texts

if TYPE_CHECKING:
    import torch

MIXED = "builtin:mixed"
#: The original model's own text only (chat answers and prose, half each): no human-written text, so a stage that
#: trains on it (distill) never sees the domains evaluate measures. Written in batches of 32 (faster than mixed's 8;
#: a cache of its own).
SELFGEN = "builtin:selfgen"
DOCS_SOURCE = "builtin:pydoc"
#: Share of the windows per domain, in the order they appear in the calibration tensor.
SHARES = {"documentation": 0.4, "chat": 0.3, "generated": 0.3}
CHAT_SAMPLING = Sampling(temperature=0.7, top_p=0.95, max_new_tokens=192)
PROSE_SAMPLING = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=192)
#: source -> (shares, chat sampling, prose sampling)
SOURCES = {
    MIXED: (SHARES, CHAT_SAMPLING, PROSE_SAMPLING),
    SELFGEN: ({"documentation": 0.0, "chat": 0.5, "generated": 0.5}, replace(CHAT_SAMPLING, batch_size=32),
              replace(PROSE_SAMPLING, batch_size=32)),
}
CHAT_PROMPTS = Path(__file__).with_name("chat_seed_prompts.txt")
PROSE_SEEDS = Path(__file__).with_name("prose_seeds.txt")


def mix_counts(samples: int, shares: dict[str, float] = SHARES) -> dict[str, int]:
    """Windows per domain: ``shares`` of ``samples``, rounded by largest remainder (ties to the earlier domain)."""
    exact = {d: share * samples for d, share in shares.items()}
    counts = {d: int(x) for d, x in exact.items()}
    by_remainder = sorted(shares, key=lambda d: -(exact[d] - counts[d]))  # stable: ties keep the shares' order
    for d in by_remainder[: samples - sum(counts.values())]:
        counts[d] += 1
    return counts


@lru_cache(maxsize=None)
def _lines(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#"))


def chat_prompts() -> list[str]:
    """The instructions the original model answers for the chat part (``chat_seed_prompts.txt``)."""
    return list(_lines(CHAT_PROMPTS))


def prose_seeds() -> list[str]:
    """The openings the original model continues for the generated part (``prose_seeds.txt``)."""
    return list(_lines(PROSE_SEEDS))


def record(cfg: Any) -> dict[str, Any]:
    """Per-domain windows and tokens, and how the generated text was made (for stage results)."""
    shares, chat, prose = SOURCES[cfg.source]
    counts = mix_counts(cfg.samples, shares)
    settings = {
        "documentation": {"source": DOCS_SOURCE, "skip_tokens": cfg.skip_tokens},
        "chat": {"prompts": CHAT_PROMPTS.name, "prompts_hash": stable_hash(chat_prompts()),
                 "rendered_with": "the tokenizer's chat template", **asdict(chat)},
        "generated": {"seeds": PROSE_SEEDS.name, "seeds_hash": stable_hash(prose_seeds()), **asdict(prose)},
    }
    return {d: {"samples": n, "tokens": n * cfg.seq_len, **settings[d]} for d, n in counts.items() if n}


def load_mixed(cfg: Any, tokenizer: Any, model: Any, load_calibration: Callable,
               render_chat: Callable) -> "torch.Tensor":
    """The ``(samples, seq_len)`` windows of ``builtin:mixed``: documentation, then chat, then generated prose.
    ``load_calibration`` and ``render_chat`` are calibration.py's (passed in, so this module does not import it)."""
    import torch

    shares, chat, prose = SOURCES[cfg.source]
    if model is None:
        raise LLMCompressError(
            f"calibration.source `{cfg.source}` has the original model write {1 - shares['documentation']:.0%} of "
            f"its text (chat answers and prose), but load_calibration got no `model`. Fix: pass `model=` (the run's "
            f"`ctx.original`, or a loaded transformers model), or set `source: {DOCS_SOURCE}`."
        )
    counts = mix_counts(cfg.samples, shares)
    parts = []
    if counts["documentation"]:
        docs = cfg.model_copy(update={"source": DOCS_SOURCE, "samples": counts["documentation"]})
        parts.append(load_calibration(docs, tokenizer))
    with Writer(model) as writer:  # the model loads at most once, at the first batch not cached
        if counts["chat"]:
            parts.append(_chat_windows(cfg, tokenizer, writer, counts["chat"], render_chat, chat))
        if counts["generated"]:
            parts.append(_prose_windows(cfg, tokenizer, writer, counts["generated"], prose))
    return torch.cat(parts).contiguous()  # (samples, seq_len)


def _shuffled(items: list[str], seed: int, domain: str) -> list[str]:
    items = list(items)
    random.Random(stable_hash([seed, domain, "order"])).shuffle(items)
    return items


def _chat_windows(cfg: Any, tokenizer: Any, writer: Writer, n: int, _render_chat: Callable,
                  sampling: Sampling = CHAT_SAMPLING) -> "torch.Tensor":
    questions = _shuffled(chat_prompts(), cfg.seed, "chat")
    inputs = [chat_prompt(q, tokenizer) for q in questions]

    sep = "\n\n" if _no_template(tokenizer) else ""  # a template ends each turn with its own marker and newline

    def chats(answers: list[str]) -> str:
        return sep.join(_render_chat([{"role": "user", "content": questions[i % len(questions)]},
                                      {"role": "assistant", "content": a.strip()}], tokenizer)
                        for i, a in enumerate(answers))

    answers = generated_texts(writer, tokenizer, "chat", inputs, sampling, cfg.seed,
                              _enough(chats, tokenizer, n * cfg.seq_len), _template_key(tokenizer))
    return _windows(chats(answers), tokenizer, n, cfg.seq_len)


def _prose_windows(cfg: Any, tokenizer: Any, writer: Writer, n: int, sampling: Sampling = PROSE_SAMPLING,
                   ) -> "torch.Tensor":
    seeds = _shuffled(prose_seeds(), cfg.seed, "generated")

    def prose(continuations: list[str]) -> str:
        return "\n\n".join(seeds[i % len(seeds)] + c for i, c in enumerate(continuations))

    texts = generated_texts(writer, tokenizer, "generated", seeds, sampling, cfg.seed,
                            _enough(prose, tokenizer, n * cfg.seq_len), {})
    return _windows(prose(texts), tokenizer, n, cfg.seq_len)


def chat_prompt(question: str, tokenizer: Any) -> str:
    """The model's input for one instruction: the user turn and the start of the assistant's, as its template writes
    them (``user: ...`` / ``assistant:`` lines for a tokenizer without a template)."""
    if _no_template(tokenizer):
        return f"user: {question}\nassistant: "
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def _no_template(tokenizer: Any) -> bool:
    return not getattr(tokenizer, "chat_template", None)


def _template_key(tokenizer: Any) -> dict[str, Any]:
    return {"chat_template": stable_hash(getattr(tokenizer, "chat_template", None) or "")}


def _tokens(text: str, tokenizer: Any) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _enough(join: Any, tokenizer: Any, need: int) -> Any:
    return lambda outputs: bool(outputs) and len(_tokens(join(outputs), tokenizer)) >= need


def _windows(text: str, tokenizer: Any, n: int, seq_len: int) -> "torch.Tensor":
    """The first ``n`` consecutive windows of ``seq_len`` tokens of ``text``: ``(n, seq_len)``."""
    import torch

    ids = _tokens(text, tokenizer)[: n * seq_len]
    return torch.tensor(ids, dtype=torch.long).view(n, seq_len)
