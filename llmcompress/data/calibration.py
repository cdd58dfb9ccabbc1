"""Calibration data: the text a method runs through the model to see real activations (GPTQ, AWQ, Wanda, SmoothQuant).

    calibration: {source: builtin:mixed, samples: 16, seq_len: 256, seed: 0, skip_tokens: 4096}

A source is read as documents (strings), the documents are joined and tokenized once, the first ``skip_tokens`` are
dropped, the rest is cut into non-overlapping windows of ``seq_len`` tokens, and ``samples`` of those windows are
drawn at random (seeded): the recipe of the GPTQ paper (random segments of a corpus), so every sample is exactly
``seq_len`` tokens and needs no padding. ``load_calibration`` returns them as one ``(samples, seq_len)`` int64
tensor; ``to_records`` turns that into the ``[{"input_ids", "attention_mask"}]`` rows that gptqmodel and
``datasets.Dataset.from_list`` take.

Sources:
- ``builtin:mixed`` (the default): 40% ``builtin:pydoc`` windows, 30% chats in which the original model answers
  open-ended instructions (rendered with its chat template), 30% prose the original model writes from short openings
  (``mixed.py`` says why, how, and what it costs). ``load_calibration`` needs the original model for it (``model=``)
  and raises without one; the generated text is cached, so only the first run with a model and seed pays for it.
- ``builtin:pydoc``: Python's reference documentation (``pydoc_data.topics``, ~120k SmolLM2 tokens), on every Python.
  The default evaluation reads the same documentation, so a method calibrated on it is evaluated in-domain
  (``skip_tokens`` keeps clear of the perplexity windows, not of the lm-eval tasks' passages); for an
  out-of-domain check evaluate on another corpus as well (``perplexity: {corpus: my.txt}``).
- ``path/to/file.txt``: the whole file is one document.
- ``path/to/file.jsonl``: one JSON object per line, with a ``text`` string, or ``messages`` (a chat, rendered with the
  tokenizer's chat template), or ``prompt`` + ``response`` (rendered as a two-turn chat).
- ``hf:<dataset>[:<config>]``: rows of the ``train`` split of a hub dataset, streamed (read until there is text for
  about twice the tokens needed), with the same fields as .jsonl. Only with hub access; offline it fails at once.

Paths are relative to the recipe's folder.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import LLMCompressError, RecipeError, require
from ..utils.io import read_jsonl
from .corpora import BUILTIN_PREFIX, builtin_documents, check_builtin
from .mixed import MIXED, SOURCES as GENERATED_SOURCES, load_mixed
from .mixed import record as mixed_record

if TYPE_CHECKING:
    import torch

HF_PREFIX = "hf:"
FILE_SUFFIXES = (".txt", ".jsonl")
#: Characters of hub text read per token needed (tokens average ~4 characters of English: about 2x the need).
_HF_CHARS_PER_TOKEN = 8


class CalibrationConfig(BaseModel):
    """Which text, and how much of it, a method calibrates on (``calibration:`` in a stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    source: str = Field(
        MIXED,
        description="`builtin:mixed` (40% Python's docs, 30% chats and 30% prose written by the original model), "
        "`builtin:selfgen` (the original model's chats and prose only, half each), `builtin:pydoc` (Python's "
        "reference docs), `builtin:pysource` (the standard library's source), a .txt file, a .jsonl file (`text`, "
        "`messages` or "
        "`prompt` + `response` per line; relative to the recipe), or `hf:<dataset>[:<config>]` (needs hub access).",
    )
    samples: int = Field(16, ge=1, description="Number of token windows.")
    seq_len: int = Field(256, ge=8, description="Tokens per window.")
    seed: int = Field(0, description="Seeds which windows are drawn (and, for builtin:mixed, the generated text).")
    skip_tokens: int = Field(
        4096, ge=0, description="Tokens at the start of the source never used, so that calibration stays clear of the "
        "evaluate stage's perplexity windows (the first 2,048 tokens of builtin:pydoc by default).",
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v.startswith(BUILTIN_PREFIX):
            check_builtin(v, "source", also=tuple(GENERATED_SOURCES))
        elif v.startswith(HF_PREFIX):
            name, _, config = v[len(HF_PREFIX):].partition(":")
            if not name.strip() or (":" in v[len(HF_PREFIX):] and not config.strip()):
                raise ValueError(f"`{v}` is not `hf:<dataset>` or `hf:<dataset>:<config>` (e.g. `hf:allenai/c4:en`)")
        elif not v.endswith(FILE_SUFFIXES):
            raise ValueError(
                f"source `{v}` must be `builtin:pydoc`, a .txt file, a .jsonl file or `hf:<dataset>[:<config>]`"
            )
        return v

    @property
    def tokens(self) -> int:
        """Tokens the calibration set holds (``samples * seq_len``)."""
        return self.samples * self.seq_len

    def record(self, ids: "torch.Tensor | None" = None) -> dict[str, Any]:
        """What a stage result says about its calibration: these settings, the tokens used (``ids``' size, else
        ``samples * seq_len``) and, for builtin:mixed, the windows and tokens per domain and how the generated text
        was sampled."""
        out = {**self.model_dump(), "tokens": int(ids.numel()) if ids is not None else self.tokens}
        if self.source in GENERATED_SOURCES:
            out["domains"] = mixed_record(self)
        return out

    def resolve(self, base_dir: Path | None) -> Path:
        """The file of a file source, relative to ``base_dir`` (the recipe's folder)."""
        path = Path(self.source).expanduser()
        return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def _where(cfg: CalibrationConfig) -> str:
    return f"calibration.source `{cfg.source}`"


def check_calibration(cfg: CalibrationConfig, base_dir: Path | None = None) -> None:
    """Cheap checks before any weights load: the file exists and is not empty, or the hub is reachable.

    With ``base_dir=None`` a relative path cannot be placed yet, and is left to ``load_calibration``.
    """
    if cfg.source.startswith(BUILTIN_PREFIX):
        return
    if cfg.source.startswith(HF_PREFIX):
        from ..utils.net import hub_reachable

        require("datasets", "eval", f"{_where(cfg)}")
        if not hub_reachable(datasets=True):
            raise RecipeError(
                f"{_where(cfg)} needs the Hugging Face hub, which is not reachable from here (or HF_HUB_OFFLINE / "
                f"HF_DATASETS_OFFLINE is set). Fix: use `builtin:pydoc` or a local .txt / .jsonl file."
            )
        return
    check_text_file(cfg.source, base_dir, _where(cfg))


def check_text_file(value: str, base_dir: Path | None, where: str) -> None:
    """A text file a stage reads (relative to the recipe's folder ``base_dir``) exists and holds text the stage can
    read: UTF-8 and not binary (.txt), or rows with text (.jsonl), not only blank lines. With ``base_dir=None`` a
    relative path cannot be placed yet, and is left to the reader."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        if base_dir is None:
            return
        path = Path(base_dir) / path
    if not path.is_file():
        raise RecipeError(f"{where}: no such file `{path}`. Fix: check the path (relative to the recipe's folder), "
                          "or use `builtin:pydoc`.")
    if path.stat().st_size == 0:
        raise RecipeError(f"{where}: `{path}` is empty. Fix: point to a file with text in it.")
    has_text = bool(_jsonl_rows(path)) if path.suffix == ".jsonl" else bool(read_txt(path).strip())
    if not has_text:
        raise RecipeError(f"{where}: `{path}` has no text. Fix: point to a file with text in it (this one holds "
                          "only blank lines).")


def read_txt(path: Path) -> str:
    """A .txt source's text; RecipeError naming the file when it is binary or not UTF-8."""
    data = Path(path).read_bytes()
    if b"\0" in data:
        raise RecipeError(f"{path}: a binary file (it holds NUL bytes), not text. Fix: point to a UTF-8 text file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte {e.start}). Fix: save it as UTF-8.") from None


def read_calibration_texts(cfg: CalibrationConfig, base_dir: Path | None = None, tokenizer: Any = None) -> list[str]:
    """The source as a list of documents. ``tokenizer`` renders chat rows with its chat template (else plain lines)."""
    check_calibration(cfg, base_dir)
    if cfg.source in GENERATED_SOURCES:
        raise LLMCompressError(f"{_where(cfg)} is partly written by the original model, so it has no documents to "
                               f"read. Fix: use load_calibration(cfg, tokenizer, model=...).")
    if cfg.source.startswith(BUILTIN_PREFIX):
        docs = builtin_documents(cfg.source)
    elif cfg.source.startswith(HF_PREFIX):
        docs = _hf_texts(cfg, tokenizer)
    else:
        path = cfg.resolve(base_dir)
        if path.suffix == ".txt":
            docs = [read_txt(path)]
        else:
            docs = _jsonl_texts(path, tokenizer)
    docs = [d for d in docs if d.strip()]
    if not docs:
        where = cfg.resolve(base_dir) if cfg.source.endswith(FILE_SUFFIXES) else cfg.source
        raise RecipeError(f"{_where(cfg)}: `{where}` has no text. Fix: point to a source with text in it.")
    return docs


def load_calibration(
    cfg: CalibrationConfig, tokenizer: Any, base_dir: Path | None = None, model: Any = None
) -> "torch.Tensor":
    """``samples`` random windows of ``seq_len`` tokens from the source: an int64 tensor ``(samples, seq_len)``.

    Deterministic for a given source, tokenizer and seed (and, for builtin:mixed, model). Raises RecipeError when the
    source is too short.

    Args:
        model: the original model, which writes part of ``builtin:mixed`` (a ``ModelHandle`` such as
            ``ctx.original``, loaded only when its text is not cached yet, or a loaded transformers model). Other
            sources ignore it; ``builtin:mixed`` without it raises LLMCompressError.
    """
    import torch

    if cfg.source in GENERATED_SOURCES:
        return load_mixed(cfg, tokenizer, model, load_calibration, _render_chat)
    docs = read_calibration_texts(cfg, base_dir, tokenizer)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"][cfg.skip_tokens:]  # (T,)
    windows = len(ids) // cfg.seq_len
    if windows < cfg.samples:
        where = cfg.resolve(base_dir) if cfg.source.endswith(FILE_SUFFIXES) else cfg.source
        raise RecipeError(
            f"{_where(cfg)}: `{where}` has {len(ids):,} tokens after skip_tokens={cfg.skip_tokens}, which make "
            f"{windows} windows of seq_len {cfg.seq_len}, but samples={cfg.samples} needs {cfg.tokens:,} tokens. "
            f"Fix: add text, or lower `samples`, `seq_len` or `skip_tokens`."
        )
    picked = sorted(random.Random(cfg.seed).sample(range(windows), cfg.samples))
    stream = torch.tensor(ids[: windows * cfg.seq_len], dtype=torch.long).view(windows, cfg.seq_len)
    return stream[picked].contiguous()  # (samples, seq_len)


def as_sources(value: "CalibrationConfig | list[CalibrationConfig]") -> list[CalibrationConfig]:
    """One source or a list of them, as a list."""
    return list(value) if isinstance(value, list) else [value]


def check_source_list(value: "CalibrationConfig | list[CalibrationConfig]", field: str) -> None:
    """A list of sources must be non-empty and share one ``seq_len`` (its windows go into one tensor); ValueError
    with the fix otherwise (pydantic turns it into the recipe error)."""
    if not isinstance(value, list):
        return
    if not value:
        raise ValueError(f"`{field}` is an empty list. Fix: one source, e.g. `{field}: {{source: builtin:pysource, "
                         f"samples: 32, seq_len: 256}}`, or a list of them")
    lengths = sorted({d.seq_len for d in value})
    if len(lengths) > 1:
        raise ValueError(f"`{field}` lists sources with different seq_len ({', '.join(map(str, lengths))}); their "
                         f"windows are used together. Fix: give every source the same `seq_len`, e.g. {lengths[-1]}")


def load_sources(value: "CalibrationConfig | list[CalibrationConfig]", tokenizer: Any, base_dir: Path | None = None,
                 model: Any = None) -> "torch.Tensor":
    """``load_calibration`` of every source, one after another: ``(samples summed over the sources, seq_len)``."""
    import torch

    return torch.cat([load_calibration(c, tokenizer, base_dir, model=model) for c in as_sources(value)])


def record_sources(value: "CalibrationConfig | list[CalibrationConfig]", ids: "torch.Tensor") -> Any:
    """``record`` for one source (with ``ids``' size), or a list of the sources' records (their own sizes)."""
    return value.record(ids) if not isinstance(value, list) else [c.record() for c in value]


def to_records(ids: "torch.Tensor") -> list[dict[str, list[int]]]:
    """``(N, L)`` token ids -> ``[{"input_ids": [...], "attention_mask": [1, ...]}]`` (gptqmodel, datasets)."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> text


def _row_text(row: Any, tokenizer: Any) -> str | None:
    """A .jsonl / dataset row as text, or None when it has none of the known fields."""
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    if isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        return _render_chat(messages, tokenizer)
    return None


def _render_chat(messages: list[dict], tokenizer: Any) -> str:
    """With the model's chat template when it has one (how the model sees chats), else ``role: content`` lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


_ROW_FIX = ('Fix: write lines like {"text": "..."}, {"messages": [{"role": "user", "content": "..."}, ...]} '
            'or {"prompt": "...", "response": "..."}.')


def _jsonl_texts(path: Path, tokenizer: Any) -> list[str]:
    return [_row_text(row, tokenizer) for row in _jsonl_rows(path)]


def _jsonl_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl file, each checked to have ``text``, ``messages`` or ``prompt`` + ``response``."""
    rows = []
    for i, row in read_jsonl(path):
        if _row_text(row, None) is None:
            keys = ", ".join(f"`{k}`" for k in row) if isinstance(row, dict) else type(row).__name__
            raise RecipeError(f"{path}:{i}: no `text`, `messages` or `prompt` + `response` (got {keys}). {_ROW_FIX}")
        rows.append(row)
    return rows


def read_rows(cfg: CalibrationConfig, base_dir: Path | None = None) -> list[dict] | None:
    """The rows of a .jsonl or ``hf:`` source as dicts (for chat-aware training), or None for plain-text sources.

    At most ``cfg.samples`` rows of a hub dataset are read; a file is read whole.
    """
    check_calibration(cfg, base_dir)
    if cfg.source.startswith(HF_PREFIX):
        from datasets import load_dataset

        name, _, config = cfg.source[len(HF_PREFIX):].partition(":")
        rows = load_dataset(name, config or None, split="train", streaming=True)
        return [dict(r) for r, _ in zip(rows, range(cfg.samples))]
    if cfg.source.endswith(".jsonl"):
        return _jsonl_rows(cfg.resolve(base_dir))
    return None


def _hf_texts(cfg: CalibrationConfig, tokenizer: Any) -> list[str]:
    from datasets import load_dataset

    name, _, config = cfg.source[len(HF_PREFIX):].partition(":")
    try:
        rows = load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        raise RecipeError(f"{_where(cfg)}: could not open the dataset ({type(e).__name__}: {e}). "
                          f"Fix: check the dataset name and config on the hub.") from None
    texts, chars, need = [], 0, cfg.tokens * _HF_CHARS_PER_TOKEN
    for i, row in enumerate(rows):
        text = _row_text(row, tokenizer)
        if text is None:
            raise RecipeError(f"{_where(cfg)}: row {i} has no `text`, `messages` or `prompt` + `response` "
                              f"(columns: {', '.join(row)}). Fix: pick a text dataset.")
        texts.append(text)
        chars += len(text)
        if chars >= need:
            break
    return texts
