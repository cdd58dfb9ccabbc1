"""Training sequences for the lora stage, read through ``data/calibration.py`` (one loader for every source).

- Plain text (``builtin:pydoc``, .txt, .jsonl ``text`` rows): ``samples`` random windows of ``seq_len`` tokens, every
  token a target (the calibration recipe).
- ``sft`` on chat rows (.jsonl or ``hf:`` rows with ``messages`` or ``prompt`` + ``response``): one sequence per row,
  rendered with the model's chat template; only assistant tokens are targets (labels -100 elsewhere), cut to
  ``seq_len`` and right-padded.
- ``distill`` with ``generate``: the first ``prompt_tokens`` of each window, continued by the original model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from ..data.calibration import load_calibration, read_rows
from ..errors import RecipeError

if TYPE_CHECKING:
    import torch

    from ..context import RunContext
    from .config import LoraSettings

IGNORE = -100  # label of positions that are not targets (torch cross_entropy's ignore_index)


@dataclass
class TrainData:
    """``(N, L)`` tensors; ``labels`` is ``input_ids`` with -100 where no loss is taken (padding, prompts)."""

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    labels: "torch.Tensor"
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def loss_tokens(self) -> int:
        """Target tokens (a label at position t+1 is scored by the logits at t)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def batches(self, batch_size: int, seed: int) -> Iterator[dict[str, "torch.Tensor"]]:
        """Endless micro-batches: a fresh seeded shuffle every epoch; the last short batch of an epoch is kept.
        ``index``: the rows of the batch (a teacher's cached logits are looked up by it)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=gen)
            for i in range(0, len(self), batch_size):
                idx = order[i: i + batch_size]
                yield {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                       "labels": self.labels[idx], "index": idx}


def build_data(cfg: "LoraSettings", ctx: "RunContext", tokenizer: Any, teacher: Any = None) -> TrainData:
    import torch

    base_dir = ctx.recipe.base_dir
    rows = read_rows(cfg.data, base_dir) if cfg.objective == "sft" else None
    if rows is not None and any("text" not in r for r in rows):
        return chat_data(rows[: cfg.data.samples], tokenizer, cfg.data.seq_len, len(rows))
    ids = load_calibration(cfg.data, tokenizer, base_dir, model=ctx.original)  # (samples, seq_len)
    if cfg.generate is not None:
        return generated_data(ids, teacher, tokenizer, cfg.generate, ctx)
    return TrainData(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def chat_data(rows: list[dict], tokenizer: Any, seq_len: int, available: int) -> TrainData:
    """One right-padded sequence per row; labels only on assistant turns."""
    import torch

    seqs, notes = [], []
    cut = 0
    for row in rows:
        ids, mask = chat_tokens(row, tokenizer)
        if len(ids) > seq_len:
            cut += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        if any(mask):
            seqs.append((ids, mask))
    if not seqs:
        raise RecipeError("lora sft: no row has an assistant reply within `seq_len` tokens. Fix: raise "
                          "`data.seq_len`, or give rows with `prompt` + `response` or assistant `messages`")
    if cut:
        notes.append(f"{cut} of {len(rows)} rows cut to seq_len {seq_len} tokens")
    if available > len(rows):
        notes.append(f"{len(rows)} of {available} rows used (data.samples)")
    width = max(len(ids) for ids, _ in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(mask), t, torch.full_like(t, IGNORE))
    return TrainData(input_ids=input_ids, attention_mask=attention, labels=labels, notes=notes)


def chat_tokens(row: dict, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of a chat row and, per token, whether it belongs to an assistant turn (its end marker included).

    Each assistant turn's span is found by rendering the chat up to the turn with the generation prompt (where the
    reply starts) and up to and including it (where it ends); tokens are mapped to those character spans.
    """
    if isinstance(row.get("text"), str):  # a plain-text row among chats: every token is a target
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        return list(ids), [True] * len(ids)
    messages = row.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    full = render(messages, tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, upto = render(messages[:i], tokenizer, generation_prompt=True), render(messages[: i + 1], tokenizer)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise RecipeError("lora sft: the chat template does not render a chat as a prefix of the longer chat, so "
                              "reply tokens cannot be located. Fix: use rows with `text` (loss on every token)")
        spans.append((len(prefix), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def render(messages: list[dict], tokenizer: Any, generation_prompt: bool = False) -> str:
    """A chat as the model sees it: the tokenizer's chat template, else ``role: content`` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def generated_data(windows: "torch.Tensor", teacher: Any, tokenizer: Any, gen: Any, ctx: "RunContext") -> TrainData:
    """Prompts cut from ``windows``, continued by the teacher (sampled): ``(N, prompt_tokens + new_tokens)``."""
    import torch

    if gen.prompt_tokens >= windows.shape[1]:
        raise RecipeError(f"generate.prompt_tokens ({gen.prompt_tokens}) must be < data.seq_len ({windows.shape[1]})")
    prompts = windows[:, : gen.prompt_tokens]
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with ctx.task("lora: the original model writes the distill text", total=len(prompts)) as advance:
        for i in range(0, len(prompts), gen.batch_size):
            p = prompts[i: i + gen.batch_size]
            with torch.inference_mode():
                seq = teacher.generate(input_ids=p, attention_mask=torch.ones_like(p), do_sample=True,
                                       temperature=gen.temperature, max_new_tokens=gen.new_tokens,
                                       min_new_tokens=gen.new_tokens, pad_token_id=pad)
            out.append(seq)
            advance(len(p))
    ids = torch.cat(out)
    return TrainData(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(),
                     notes=[f"distill text: {gen.new_tokens} tokens sampled from the original model "
                            f"(temperature {gen.temperature}) after {gen.prompt_tokens}-token prompts"])
