"""Chat side by side: one prompt to every chosen model, the replies streamed in parallel columns with live figures.

``ChatSession`` holds one visitor's conversation (kept server-side in a ``gr.State``, never sent back by the
browser). ``chat_turn`` validates a request against the limits, streams every column (``stream.stream_columns``)
and, in greedy mode, marks where each compressed reply first leaves the original's, token by token.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..report.metrics import fmt_bytes
from .config import LimitExceeded, Limits, check_chat
from .pool import ModelPool, PoolEntry
from .stream import Column, first_divergence, stream_columns

EXAMPLES = (
    "Explain what quantization does to a neural network, in two sentences.",
    "Write a haiku about a tiny language model.",
    "What is the capital of France, and why is it famous?",
    "List three tips for writing clear Python code.",
)
MARK_OPEN, MARK_CLOSE = '<mark class="llmc-diverge">', "</mark>"


@dataclass
class Reply:
    text: str  # what the model said (what goes back to it on the next turn)
    shown: str  # what its column shows (divergence marked, notes appended)


@dataclass
class Turn:
    prompt: str
    replies: dict[str, Reply] = field(default_factory=dict)


@dataclass
class ChatSession:
    """One visitor's conversation: per turn, the prompt and each model's reply."""

    turns: list[Turn] = field(default_factory=list)

    def messages(self, key: str, system: str, prompt: str) -> list[dict]:
        """The chat the model ``key`` sees: system prompt, its own earlier replies, the new message."""
        out = [{"role": "system", "content": system}] if system.strip() else []
        for turn in self.turns:
            if key in turn.replies:
                out += [{"role": "user", "content": turn.prompt},
                        {"role": "assistant", "content": turn.replies[key].text}]
        return out + [{"role": "user", "content": prompt}]

    def chars(self, key: str) -> int:
        return sum(len(t.prompt) + len(t.replies[key].text) for t in self.turns if key in t.replies)

    def shown(self, key: str) -> list[dict]:
        """The column's chatbot messages (gradio's messages format)."""
        out: list[dict] = []
        for turn in self.turns:
            out.append({"role": "user", "content": turn.prompt})
            reply = turn.replies.get(key)
            out.append({"role": "assistant", "content": reply.shown if reply else "*(not asked)*"})
        return out


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128

    def kwargs(self) -> dict:
        return {"temperature": 0.0} if self.greedy else {"temperature": self.temperature, "top_p": self.top_p}


def context_limit(entry: PoolEntry, backend: str = "hf") -> int | None:
    """Tokens a conversation plus its reply may take on ``backend``: a llama-server's context per slot, else the
    model's ``max_position_embeddings`` (from the hf model, or the folder's config.json for a GGUF run)."""
    engine = entry.engines.get(backend)
    options = getattr(getattr(getattr(engine, "backend", None), "server", None), "options", None)
    slot = getattr(options, "slot_ctx", None)
    if isinstance(slot, int):
        return slot
    hf = entry.engines.get("hf")
    model = getattr(hf.backend, "model", None) if hf is not None else None
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if limit is not None else _config_limit(entry.path)


def _config_limit(path) -> int | None:
    """``max_position_embeddings`` of the config.json in a model folder, or None when it has none."""
    import json
    from pathlib import Path

    try:
        value = json.loads((Path(path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def check_request(pool: ModelPool, limits: Limits, session: ChatSession, prompt: str, system: str,
                  keys: list[str], backend: str, sampling: Sampling) -> list[PoolEntry]:
    """Every limit, before any generation: the entries to ask, or ``LimitExceeded`` naming the limit and the fix."""
    if not keys:
        raise LimitExceeded("No model is selected. Tick at least one model above the chat.")
    if backend not in pool.backends:
        raise LimitExceeded(f"Backend {backend!r} is not available here; pick one of {', '.join(pool.backends)}.")
    entries = [pool.get(k) for k in dict.fromkeys(keys)]
    check_chat(prompt, system, max(session.chars(e.key) for e in entries), len(session.turns),
               sampling.max_new_tokens, sampling.temperature, sampling.top_p, limits)
    for e in entries:
        if e.tokenizer is not None and not getattr(e.tokenizer, "chat_template", None):
            raise LimitExceeded(f"{e.key} has no chat template (a base model rather than an instruct one), so it "
                                "cannot chat. Untick it above the chat; the throughput race still covers it.")
        limit = context_limit(e, backend)
        if limit is None or e.tokenizer is None:
            continue
        try:
            n = len(e.tokenizer.apply_chat_template(session.messages(e.key, system, prompt),
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
        except Exception as err:  # noqa: BLE001 - jinja's TemplateError or a ValueError: the template refused it
            raise LimitExceeded(f"{e.key}: its chat template refused this conversation ({err}). Try without a "
                                "system prompt, or untick it.") from None
        if n + sampling.max_new_tokens > limit:
            raise LimitExceeded(f"{e.key}: the conversation is {n} tokens; with {sampling.max_new_tokens} new tokens "
                                f"it exceeds the model's context of {limit}. Lower max new tokens, or press Clear.")
    return entries


def _memory(entry: PoolEntry, backend: str) -> str:
    from ..utils.memory import rss_bytes

    if backend != "hf":  # a server backend: its server's process tree (none yet: nothing to say)
        server = getattr(getattr(entry.engines.get(backend), "backend", None), "server", None)
        if server is None:
            return ""
        weights = server.model_memory_bytes()
        return (f"{server.label} RSS {fmt_bytes(server.peak_rss_bytes)} (peak)"
                + (f" · weights {fmt_bytes(weights)}" if weights else ""))
    return f"process RSS {fmt_bytes(rss_bytes())} (all hf models share it)"


def stats_line(col: Column, entry: PoolEntry, backend: str, now: float, note: str | None = None) -> str:
    """The figures under a column: time to first token, decode tokens/s, tokens, elapsed, memory."""
    parts = []
    state = "error" if col.error else ("done" if col.done else ("streaming" if col.first else "waiting"))
    parts.append(f"**{state}** ({backend})")
    if col.ttft_s is not None:
        parts.append(f"TTFT {col.ttft_s:.2f} s")
    speed = col.tok_s(now)
    if speed is not None:
        parts.append(f"{speed:.1f} tok/s")
    parts.append(f"{col.tokens} tokens")
    elapsed = col.elapsed_s(now)
    if elapsed is not None:
        parts.append(f"{elapsed:.1f} s")
    line = " · ".join(parts) + "  \n" + _memory(entry, backend)
    for extra in (col.note, note, f"⚠ {col.error}" if col.error else None):
        if extra:
            line += "  \n" + extra
    return line


def mark(pieces: list[str], index: int | None) -> str:
    """The reply with its part from token ``index`` on highlighted (where it leaves the original's reply)."""
    if index is None:
        return "".join(pieces)
    return "".join(pieces[:index]) + MARK_OPEN + html.escape("".join(pieces[index:]) or "⏹") + MARK_CLOSE


def _divergence_notes(cols: dict[str, Column], entries: list[PoolEntry]) -> tuple[dict[str, str], dict[str, int]]:
    """Per compressed column: a sentence on where it leaves the original's greedy reply, and that token index."""
    entries = [e for e in entries if e.key in cols]  # models that ran (not those whose engine could not)
    ref = next((e.key for e in entries if e.role == "original" and not cols[e.key].error), None)
    notes: dict[str, str] = {}
    where: dict[str, int] = {}
    if ref is None:
        return notes, where
    for e in entries:
        col = cols[e.key]
        if e.key == ref or col.error or not col.done:
            continue
        i = first_divergence(cols[ref].pieces, col.pieces)
        if i is None:
            notes[e.key] = f"greedy: identical to {ref}'s reply ({col.tokens} tokens)"
        else:
            where[e.key] = i
            notes[e.key] = (f"greedy: differs from {ref}'s reply from its first token (highlighted)" if i == 0 else
                            f"greedy: same as {ref} for {i} tokens, then differs (highlighted from token {i + 1})")
    return notes, where


def chat_turn(pool: ModelPool, limits: Limits, session: ChatSession, prompt: str, system: str, keys: list[str],
              backend: str, sampling: Sampling, sequential: bool = False,
              ) -> Iterator[tuple[dict[str, list[dict]], dict[str, str]]]:
    """Stream one turn: yields ``(chatbot messages per key, stats per key)`` for every loaded model, live.

    The turn is recorded in ``session`` as it streams, so a stopped chat keeps what was said.
    """
    entries = check_request(pool, limits, session, prompt, system, keys, backend, sampling)
    turn = Turn(prompt)
    session.turns.append(turn)
    stats = {k: "" for k in pool.keys()}
    sources, blocked = {}, {}
    for e in entries:
        engine = e.engines.get(backend)
        why = "this model has no such engine" if engine is None else engine.status()
        if why is not None:
            blocked[e.key] = why
            continue
        messages = session.messages(e.key, system, prompt)
        sources[e.key] = (lambda b=engine.backend, m=messages: b.chat(m, sampling.max_new_tokens, **sampling.kwargs()))
    for key, why in blocked.items():
        turn.replies[key] = Reply("", f"*{why}*")
        stats[key] = f"**not run** ({backend})  \n{why}"
    pool.busy(+1)
    cols: dict[str, Column] = {}
    try:
        for cols in stream_columns(sources, limits.timeout_s, sequential=sequential):
            now = time.perf_counter()
            for key, col in cols.items():
                turn.replies[key] = Reply(col.text, col.text + ("" if col.done else " ▌"))
                stats[key] = stats_line(col, pool.get(key), backend, now)
            yield {k: session.shown(k) for k in pool.keys()}, dict(stats)
        notes, where = _divergence_notes(cols, entries) if sampling.greedy else ({}, {})
        now = time.perf_counter()
        for key, col in cols.items():
            shown = mark(col.pieces, where.get(key)) if col.text.strip() else (
                f"*({col.tokens} whitespace tokens)*" if col.tokens else "*(empty reply)*")
            turn.replies[key] = Reply(col.text, shown + (f"\n\n*({col.note})*" if col.note else ""))
            stats[key] = stats_line(col, pool.get(key), backend, now, notes.get(key))
        yield {k: session.shown(k) for k in pool.keys()}, dict(stats)
    finally:
        pool.busy(-1)
        for key, col in cols.items():
            if not col.done:  # the visitor pressed Stop (the event was cancelled)
                turn.replies[key] = Reply(col.text, col.text + "\n\n*(stopped)*")


def header(entry: PoolEntry) -> str:
    """A column's title: name, how it was made, size on disk and in memory."""
    what = entry.method or ("original" if entry.role == "original" else "compressed")
    dtype = entry.describe.get("dtype", "?")
    lines = [f"### {entry.key}", f"{what} · {dtype} · **{fmt_bytes(entry.size_bytes)}** on disk"]
    mem = []
    if entry.weights_bytes:
        mem.append(f"weights in memory {fmt_bytes(entry.weights_bytes)}")
    if entry.peak_rss_bytes:
        mem.append(f"peak RSS alone {fmt_bytes(entry.peak_rss_bytes)} (its run's benchmark)")
    mem.append(f"loaded in {entry.load_s:.1f} s")
    lines.append(" · ".join(mem))
    for name, engine in entry.engines.items():
        if engine.reason:
            lines.append(f"*{name}: {engine.reason}*")
    return "  \n".join(lines)


def _redacted(messages: list[dict], redact: Callable[[str], str]) -> list[dict]:
    """A column's messages with ``redact`` applied to the text shown (notes such as why an engine did not run)."""
    return [{**m, "content": redact(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]


def build_chat_tab(pool: ModelPool, limits: Limits, redact: Callable[[str], str] = str) -> dict[str, Any]:
    """The Chat tab's components and events (call inside a ``gr.Blocks``). Returns the components by name.

    ``redact`` rewrites what visitors see (headers, figures, notes) so that no server path shows.
    """
    import gradio as gr

    keys = pool.keys()
    session = gr.State(None, time_to_live=3600)  # a ChatSession, made at the first message
    with gr.Row():
        chosen = gr.CheckboxGroup(keys, value=keys, label="Models in the conversation", scale=3)
        backend = gr.Radio(pool.backends, value="hf", label="Backend", scale=1)
    chatbots, stats = [], []
    with gr.Row(equal_height=False):
        for entry in pool.entries:
            with gr.Column(min_width=260):
                gr.Markdown(redact(header(entry)), elem_classes=["llmc-header"])
                chatbots.append(gr.Chatbot(label=entry.key, height=420, elem_classes=["llmc-chat"],
                                           feedback_options=None, buttons=["copy"]))
                stats.append(gr.Markdown("", elem_classes=["llmc-stats"]))
    with gr.Row():
        prompt = gr.Textbox(placeholder=f"Ask all models at once (at most {limits.max_prompt_chars:,} characters)",
                            show_label=False, scale=6, max_lines=6, elem_id="llmc-prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="llmc-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="llmc-stop")
        clear = gr.Button("Clear", scale=1, elem_id="llmc-clear")
    with gr.Accordion("Settings", open=False, elem_id="llmc-settings"):
        system = gr.Textbox("You are a helpful assistant.", label="System prompt", max_lines=4)
        with gr.Row():
            greedy = gr.Checkbox(True, label="Greedy (deterministic: marks where a compressed reply diverges)",
                                 elem_id="llmc-greedy")
            sequential = gr.Checkbox(False, label="One model at a time (fair speed figures on a small CPU)")
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, 0.7, step=0.05, label="Temperature (when not greedy)")
            top_p = gr.Slider(0.05, 1.0, 0.95, step=0.05, label="Top-p (when not greedy)")
            max_new = gr.Slider(1, limits.max_new_tokens, limits.default_new_tokens, step=1, label="Max new tokens")
    gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")

    def respond(text, system_text, keys_, backend_, greedy_, temp_, top_p_, max_new_, seq_, state):
        sampling = Sampling(bool(greedy_), float(temp_), float(top_p_), int(max_new_))
        state = state if isinstance(state, ChatSession) else ChatSession()
        try:
            turns = chat_turn(pool, limits, state, text or "", system_text or "", list(keys_ or []), backend_,
                              sampling, bool(seq_))
            for shown, lines in turns:
                yield [state, ""] + [_redacted(shown[k], redact) for k in keys] + [redact(lines[k]) for k in keys]
        except LimitExceeded as e:
            raise gr.Error(redact(str(e)), duration=10) from None

    def reset():
        return [ChatSession()] + [[] for _ in keys] + ["" for _ in keys]

    inputs = [prompt, system, chosen, backend, greedy, temperature, top_p, max_new, sequential, session]
    outputs = [session, prompt] + chatbots + stats
    common = dict(inputs=inputs, outputs=outputs, concurrency_limit=limits.concurrency, concurrency_id="chat",
                  time_limit=int(limits.timeout_s + 30), show_progress="hidden")
    sent = send.click(respond, api_name="chat", **common)
    submitted = prompt.submit(respond, api_visibility="private", **common)
    stop.click(None, cancels=[sent, submitted], api_visibility="private")
    clear.click(reset, outputs=[session] + chatbots + stats, api_name="clear", cancels=[sent, submitted])
    return {"chatbots": chatbots, "stats": stats, "prompt": prompt, "send": send, "stop": stop, "clear": clear}
