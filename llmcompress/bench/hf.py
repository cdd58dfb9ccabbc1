"""The transformers backend: ``model.generate`` on a batch of equal-length prompts, timed with a streamer.

The streamer receives the prompt before prefill, then every generated token as soon as it is chosen, so one call gives
the time to first token and the decode time (prefill excluded) without a second generate.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from .base import GenTiming
from .prompts import prompt_ids

if TYPE_CHECKING:
    from ..context import ModelHandle


class _Clock:
    """A ``BaseStreamer`` stand-in that records when each ``put`` arrives (put 0 = the prompt, then one per step)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:  # generate moved `value` to the CPU, so the device has finished this step
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFBackend:
    """Times ``transformers`` generation of an already loaded model (dense, bitsandbytes or our rtn format)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu"):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    @classmethod
    def from_handle(cls, handle: "ModelHandle") -> "HFBackend":
        model, tokenizer = handle.load()
        return cls(model, tokenizer, handle.runtime.device)

    def check(self, prompt_tokens: int, new_tokens: int, where: str) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and prompt_tokens + new_tokens > limit:
            raise RecipeError(
                f"{where}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
                f"max_position_embeddings ({limit}). Fix: lower `prompt_tokens` or `new_tokens`."
            )

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        return prompt_ids(self.tokenizer, batch, tokens)

    def param_bytes(self) -> int:
        from ..models.loading import param_bytes

        return param_bytes(self.model)

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        import torch

        device = next(self.model.parameters()).device
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, T)
        batch, plen = ids.shape
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        clock = _Clock()
        self._sync()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, streamer=clock,
            )
            self._sync()
            t_end = time.perf_counter()
        steps = len(clock.times) - 1  # put 0 is the prompt
        if steps != new_tokens or out.shape[1] != plen + new_tokens:
            raise RuntimeError(
                f"hf benchmark: generate returned {out.shape[1] - plen} new tokens ({steps} streamed), expected "
                f"{new_tokens}; min_new_tokens did not hold (does the model's generation_config stop early?)."
            )
        first, last = clock.times[1], clock.times[-1]
        return GenTiming(batch_size=batch, prompt_tokens=plen, new_tokens=new_tokens,
                         ttft_s=first - t0, decode_s=last - first, total_s=t_end - t0)
