"""Chat answers: both models reply to the same prompts (chat template, greedy), and the report counts the flips.

A flip is a prompt the original answers right and the compressed model gets wrong: what a user of the compressed
model notices first. Prompts come from a JSON-lines file, one ``{"prompt": ..., "answer": ..., "kind": ...}`` per
line; ``answer`` (optional) is a short string that a correct reply contains, matched case-insensitively as a whole
word or number (``12`` does not match ``123``; runs of spaces count as one). The default set, ``builtin:chat``, is
``llmcompress/evals/chat/default.jsonl`` (facts, arithmetic, instructions; ``evals/chat/build.py`` beside it writes
it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import RecipeError
from ..utils.io import read_jsonl

BUILTIN_PROMPTS = {"builtin:chat": "chat/default.jsonl"}  # relative to the shipped llmcompress/evals/ folder
_KEYS = ("prompt", "answer", "kind")
MAX_FILE_BYTES = 16 << 20  # a prompt set is a few hundred lines; a bigger file is a wrong path
#: How many flipped (and gained) items a results dict keeps; the counts are always exact.
MAX_LISTED = 200


class ChatConfig(BaseModel):
    """Chat answers settings (``chat:`` in an evaluate stage; ``chat: {}`` takes the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: str = Field(
        "builtin:chat",
        description="`builtin:chat` (the shipped set: facts, arithmetic, instructions), or a .jsonl file of "
        '{"prompt": ..., "answer": ..., "kind": ...} rows (relative to the recipe).',
    )
    max_new_tokens: int = Field(24, ge=1, le=4096, description="Tokens each reply may have (it stops at EOS).")
    limit: int | None = Field(None, ge=1, description="Use the first N prompts only; null = all.")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts generated at once (transformers; left padding). "
                            "In bf16 a few replies depend on their batch; 1 removes that, ~5x slower.")
    system: str | None = Field(None, description="A system message before each prompt; null = none (the model's "
                               "chat template may add its own default).")

    @field_validator("prompts")
    @classmethod
    def _known_prompts(cls, v: str) -> str:
        from ..registry import did_you_mean

        if v.startswith("builtin:") and v not in BUILTIN_PROMPTS:
            choices = list(BUILTIN_PROMPTS)
            raise ValueError(f"unknown prompt set `{v}`.{did_you_mean(v, choices)} Builtin: {', '.join(choices)}")
        if not v.startswith("builtin:") and not v.endswith(".jsonl"):
            raise ValueError(f"prompts `{v}` must be `builtin:chat` or a .jsonl file of "
                             '{"prompt": ..., "answer": ...} rows')
        return v


@dataclass(frozen=True)
class ChatPrompt:
    prompt: str
    answer: str | None = None  # a string a correct reply contains; None = not scored (replies still compared)
    kind: str | None = None  # a label the report groups by (facts, arithmetic, ...)


@dataclass(frozen=True)
class Reply:
    text: str
    ids: tuple[int, ...]  # the generated token ids, EOS excluded


# ---------------------------------------------------------------------------------------------------------------------
# The prompt file


def prompts_path(prompts: str, base_dir: Path | None = None) -> Path:
    """The file behind ``prompts``: a builtin set in the shipped ``llmcompress/evals/`` folder, else a path relative
    to ``base_dir``."""
    if prompts in BUILTIN_PROMPTS:
        from ..evals import path as shipped

        return shipped() / BUILTIN_PROMPTS[prompts]
    path = Path(prompts).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def load_prompts(cfg: ChatConfig, base_dir: Path | None = None) -> list[ChatPrompt]:
    """The rows of ``cfg.prompts`` (the first ``cfg.limit``); RecipeError naming the file, the line and the fix."""
    path = prompts_path(cfg.prompts, base_dir)
    if not path.is_file():  # also refuses folders, FIFOs and devices (reading a FIFO or /dev/zero never ends)
        what = "is not a regular file" if path.exists() else "does not exist"
        raise RecipeError(f"chat.prompts: `{path}` {what}. Fix: point to a JSON-lines file of prompts (relative to "
                          "the recipe).")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise RecipeError(f"chat.prompts: `{path}` is larger than {MAX_FILE_BYTES >> 20} MiB. Fix: point to a "
                          "JSON-lines file of prompts (a few hundred lines).")
    rows: list[ChatPrompt] = []
    seen: dict[str, int] = {}
    for line, value in read_jsonl(path):
        row = _row(path, line, value)
        if row.prompt in seen:
            raise RecipeError(f"{path}:{line}: the same prompt as line {seen[row.prompt]}. Fix: remove one of them "
                              "(a repeated prompt would count twice).")
        seen[row.prompt] = line
        rows.append(row)
        if cfg.limit is not None and len(rows) == cfg.limit:
            break
    if not rows:
        raise RecipeError(f"chat.prompts: `{path}` has no rows. Fix: write one JSON object per line, like "
                          '{"prompt": "What is the capital of France?", "answer": "Paris"}.')
    return rows


def _row(path: Path, line: int, value: Any) -> ChatPrompt:
    from ..registry import did_you_mean

    where = f"{path}:{line}"
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: {_what(value)}, not an object. Fix: write lines like "
                          '{"prompt": "What is 2 + 3?", "answer": "5"}.')
    for key in value:
        if key not in _KEYS:
            raise RecipeError(f"{where}: unknown key `{key}`.{did_you_mean(str(key), list(_KEYS))} Fix: use "
                              f"{', '.join(f'`{k}`' for k in _KEYS)} only.")
    prompt = value.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        got = "no `prompt`" if prompt is None else f"`prompt` is {_what(prompt)}"
        raise RecipeError(f'{where}: {got}. Fix: give each line a non-empty string `prompt`, like {{"prompt": '
                          '"What is 2 + 3?", "answer": "5"}.')
    answer = value.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise RecipeError(f"{where}: `answer` is {_what(answer)}. Fix: a non-empty string that a correct reply "
                          'contains (`"5"`, not `5`), or leave `answer` out to compare replies only.')
    kind = value.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise RecipeError(f"{where}: `kind` is {_what(kind)}. Fix: a string label, like `\"facts\"`.")
    return ChatPrompt(prompt, answer, kind)


def _what(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string"
    if value is None:
        return "null"
    name = {"dict": "object", "list": "array", "int": "integer", "float": "number", "bool": "boolean"}.get(
        type(value).__name__, type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({json.dumps(value)[:40]})"


def prompts_fingerprint(rows: list[ChatPrompt]) -> str:
    """Identifies the prompts used (after ``limit``), for the cache of the original's results."""
    blob = json.dumps([[r.prompt, r.answer, r.kind] for r in rows], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def answer_all(model: Any, tokenizer: Any, rows: list[ChatPrompt], cfg: ChatConfig,
               progress: Callable[[int], None] | None = None) -> list[Reply]:
    """Greedy replies to ``rows`` (chat template with the generation prompt, at most ``cfg.max_new_tokens``, stop
    at EOS), in the order of ``rows``.

    A transformers model answers ``cfg.batch_size`` prompts at a time, left-padded (prompts sorted by length, so the
    batches are the same for every model); a model with ``greedy_text`` (llama.cpp) one at a time, its reply's ids
    re-tokenized from its text. In float32 a batched reply equals the one-by-one reply; in bf16/fp16 padding changes
    the rounding and a few replies depend on their batch. ``progress(n)`` after every n prompts.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError("chat: the model's tokenizer has no chat template, so prompts cannot be put as a chat. "
                          "Fix: evaluate an instruction-tuned model, or remove `chat:`.")
    prompts = [_prompt_ids(tokenizer, r.prompt, cfg.system) for r in rows]
    if callable(getattr(model, "greedy_text", None)):  # not transformers: an engine with its own generation
        return _answer_engine(model, tokenizer, prompts, cfg, progress)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    out: dict[int, Reply] = {}
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        for i, ids in zip(batch, generate_greedy(model, tokenizer, [prompts[i] for i in batch], cfg.max_new_tokens)):
            out[i] = Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(), tuple(ids))
        if progress is not None:
            progress(len(batch))
    return [out[i] for i in range(len(prompts))]


def _prompt_ids(tokenizer: Any, prompt: str, system: str | None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes any BOS itself


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the model's generation config's EOS (one or a list) and the tokenizer's."""
    ids: list[int] = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def generate_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` as one left-padded batch, each cut before its first EOS."""
    import torch

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    width = max(len(p) for p in prompts)
    # Left padding: every prompt ends at the last column, so the new tokens of all rows start together.
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, repetition_penalty=1.0, pad_token_id=pad,
                             eos_token_id=eos or None)
    replies = []
    for row in out[:, width:].tolist():  # (B, new) ; rows that ended early are padded after their EOS
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        replies.append(row[:cut])
    return replies


def _answer_engine(model: Any, tokenizer: Any, prompts: list[list[int]], cfg: ChatConfig,
                   progress: Callable[[int], None] | None) -> list[Reply]:
    stop = [tokenizer.eos_token] if isinstance(tokenizer.eos_token, str) else []
    replies = []
    for ids in prompts:
        text = model.greedy_text(ids, cfg.max_new_tokens, stop).strip()
        replies.append(Reply(text, tuple(tokenizer(text, add_special_tokens=False)["input_ids"])))
        if progress is not None:
            progress(1)
    return replies


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def is_correct(answer: str | None, reply: str) -> bool | None:
    """Whether ``reply`` contains ``answer`` (case-insensitive, as a whole word or number); None without an answer."""
    if answer is None:
        return None
    want = re.escape(" ".join(answer.casefold().split()))
    return re.search(rf"(?<!\w){want}(?!\w)", " ".join(reply.casefold().split())) is not None


def first_divergence(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int | None:
    """Index of the first generated token where ``a`` and ``b`` differ (the shorter length when one is a prefix of
    the other); None when they are identical."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def model_results(rows: list[ChatPrompt], replies: list[Reply]) -> dict[str, Any]:
    """One model's figures: ``{"n", "n_with_answer", "correct", "accuracy", "by_kind", "replies"}``.

    ``accuracy`` is correct / n_with_answer (None when no row has an answer); ``by_kind`` the same per ``kind``;
    ``replies``: ``{"text", "ids", "correct"}`` per prompt, in file order.
    """
    marks = [is_correct(r.answer, rep.text) for r, rep in zip(rows, replies)]
    out = _counts(marks)
    kinds: dict[str, list] = {}
    for r, mark in zip(rows, marks):
        if r.kind is not None:
            kinds.setdefault(r.kind, []).append(mark)
    out["by_kind"] = {k: {key: v for key, v in _counts(m).items() if key != "n"} for k, m in kinds.items()}
    out["replies"] = [{"text": rep.text, "ids": list(rep.ids), "correct": mark} for rep, mark in zip(replies, marks)]
    return out


def _counts(marks: list[bool | None]) -> dict[str, Any]:
    scored = [m for m in marks if m is not None]
    return {"n": len(marks), "n_with_answer": len(scored), "correct": sum(scored),
            "accuracy": sum(scored) / len(scored) if scored else None}


def compare(rows: list[ChatPrompt], original: dict, compressed: dict, max_listed: int = MAX_LISTED) -> dict[str, Any]:
    """The compressed model's replies against the original's (``model_results`` dicts of the same rows).

    Returns ``{"flips", "gains", "flipped", "gained", "identical", "exact_agreement", "diverged",
    "mean_first_divergence"}``: flips = right before, wrong after; gains = wrong before, right after (rows with an
    answer only); flipped/gained list them (``{"index", "kind", "prompt", "answer", "original", "compressed"}``, at
    most ``max_listed``); exact_agreement = share of prompts whose reply text equals the original's;
    mean_first_divergence = mean index of the first differing generated token over the replies whose tokens differ
    (identical replies are excluded; None when all are identical), ``diverged`` of them.
    """
    flipped, gained, divergences, identical = [], [], [], 0
    for i, (row, o, c) in enumerate(zip(rows, original["replies"], compressed["replies"])):
        identical += o["text"] == c["text"]
        d = first_divergence(o["ids"], c["ids"])
        if d is not None:
            divergences.append(d)
        if o["correct"] is None or o["correct"] == c["correct"]:
            continue
        item = {"index": i, "kind": row.kind, "prompt": row.prompt, "answer": row.answer, "original": o["text"],
                "compressed": c["text"]}
        (flipped if o["correct"] else gained).append(item)
    n = len(rows)
    return {"flips": len(flipped), "gains": len(gained), "flipped": flipped[:max_listed], "gained": gained[:max_listed],
            "identical": identical, "exact_agreement": identical / n if n else None, "diverged": len(divergences),
            "mean_first_divergence": sum(divergences) / len(divergences) if divergences else None}


def summary_line(original: dict, compressed: dict | None) -> str:
    """"correct 171 -> 160 of 300; 14 flips, 3 gains; 78% identical replies" (``compressed`` None: original only)."""
    of = f"of {original['n_with_answer']}" if original["n_with_answer"] else "(no answers given)"
    if compressed is None or "flips" not in compressed:
        return f"correct {original['correct']} {of} (original only)"
    text = f"correct {original['correct']} -> {compressed['correct']} {of}; "
    text += f"{_plural(compressed['flips'], 'flip')}, {_plural(compressed['gains'], 'gain')}; "
    return text + f"{compressed['exact_agreement']:.0%} identical replies"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
