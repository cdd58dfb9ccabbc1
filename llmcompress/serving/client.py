"""Talking to an OpenAI-compatible server: timed streaming completions (for benchmarks) and streaming chat.

Every streamed chunk carries the tokens vLLM produced in one engine step, so the arrival time of each chunk is the
time of its token(s): time to first token and inter-token latencies come from one request, as a client sees them.
A server started with an API key gets it as a bearer token (``api_key``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from ..errors import LLMCompressError


@dataclass
class RequestTiming:
    """One streamed request. Times are seconds since the batch was sent."""

    sent_s: float
    # Arrival of each generated token: one per streamed chunk; when the server counted more tokens than chunks, the
    # extra ones are spread evenly over the last chunk's interval (from the chunk before it, or from sending).
    token_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""

    @property
    def ttft_s(self) -> float:
        return self.token_s[0] - self.sent_s

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_s, self.token_s[1:])]


async def _sse(response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[6:].strip()
        if payload == "[DONE]":
            return
        data = json.loads(payload)
        if "error" in data or data.get("object") == "error":
            raise LLMCompressError(f"the server reported an error mid-stream: {data.get('error', data)}")
        yield data


async def timed_completion(client, base_url: str, model: str, prompt: list[int] | str, max_tokens: int,
                           t0: float, **params: Any) -> RequestTiming:
    """Stream one completion of exactly ``max_tokens`` greedy tokens (``ignore_eos``), timing every token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **params}
    timing = RequestTiming(sent_s=time.perf_counter() - t0)
    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:500]
            raise LLMCompressError(f"{base_url}/v1/completions answered {response.status_code}: {detail}"
                                   + _auth_hint(response.status_code))
        async for chunk in _sse(response):
            now = time.perf_counter() - t0
            if chunk.get("usage"):
                timing.prompt_tokens = chunk["usage"]["prompt_tokens"]
                timing.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                timing.text += choice.get("text") or ""
                timing.token_s.append(now)
    n = timing.completion_tokens or len(timing.token_s)
    if n < len(timing.token_s):  # more chunks than tokens (a closing chunk with no token): the first n are tokens
        del timing.token_s[n:]
    if n > len(timing.token_s) and timing.token_s:  # chunks held several tokens: spread the extra over the last one
        last, k = timing.token_s[-1], n - len(timing.token_s)
        prev = timing.token_s[-2] if len(timing.token_s) > 1 else timing.sent_s
        timing.token_s[-1:] = [prev + (last - prev) * (i + 1) / (k + 1) for i in range(k + 1)]
    if n != max_tokens:
        raise LLMCompressError(f"{base_url}: asked for {max_tokens} tokens, got {n} (ignore_eos not honoured?)")
    return timing


def _auth_hint(status: int) -> str:
    return (". Fix: the server requires an API key: pass the one it was started with (serve --api-key, "
            "$LLMCOMPRESS_API_KEY)" if status == 401 else "")


def run_batch(base_url: str, model: str, prompts: list, max_tokens: int, timeout_s: float = 600,
              api_key: str | None = None, **params: Any) -> tuple[list[RequestTiming], float]:
    """Send all ``prompts`` at once (concurrency = len(prompts)); return their timings and the wall time."""
    import httpx

    from .auth import bearer

    async def go() -> tuple[list[RequestTiming], float]:
        limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
        async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=bearer(api_key)) as client:
            t0 = time.perf_counter()
            out = await asyncio.gather(*[timed_completion(client, base_url, model, p, max_tokens, t0, **params)
                                         for p in prompts])
            return list(out), time.perf_counter() - t0

    try:
        return asyncio.run(go())
    except httpx.HTTPError as e:
        raise LLMCompressError(f"{base_url}: request failed ({e.__class__.__name__}: {e}); is the server up?") from None


def stream_chat(base_url: str, model: str, messages: list[dict], max_tokens: int = 256, timeout_s: float = 600,
                api_key: str | None = None, **params: Any) -> Iterator[str]:
    """Yield the text of a chat completion piece by piece (for chat UIs). Blocking, one request."""
    import httpx

    from .auth import bearer

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **params}
    with httpx.Client(timeout=timeout_s, headers=bearer(api_key)) as client, client.stream(
        "POST", f"{base_url}/v1/chat/completions", json=body
    ) as response:
        if response.status_code != 200:
            raise LLMCompressError(f"{base_url}/v1/chat/completions answered {response.status_code}: "
                                   f"{response.read().decode(errors='replace')[:500]}"
                                   + _auth_hint(response.status_code))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise LLMCompressError(f"the server reported an error mid-stream: {data['error']}")
            for choice in data.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece
