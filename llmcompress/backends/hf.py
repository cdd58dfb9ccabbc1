"""The transformers backend: ``model.generate`` on a batch of equal-length prompts, timed with a streamer.

The streamer receives the prompt before prefill, then every generated token as soon as it is chosen, so one call gives
the time to first token and the decode time (prefill excluded) without a second generate.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterator

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
    """Times ``transformers`` generation of an already loaded model, in any format its ``ModelHandle`` loads."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu", handle: "ModelHandle | None" = None):
        self.model, self.tokenizer, self.device, self.handle = model, tokenizer, device, handle
        self._param_bytes: int | None = None
        self._describe: dict | None = None

    @classmethod
    def open(cls, handle: "ModelHandle", ctx: Any = None, **overrides: Any) -> "HFBackend":
        if overrides:
            raise TypeError(f"the hf backend takes no engine settings, got {sorted(overrides)}")
        if handle.meta.get("format") == "gguf":
            from ..serving.support import Unservable

            raise Unservable(f"`{handle.path}` is a GGUF file, which runs under llama.cpp. Fix: add `llamacpp` to "
                             "`backends`.")
        model, tokenizer = handle.load()
        return cls(model, tokenizer, handle.runtime.device, handle)

    @property
    def suspended(self) -> bool:
        return self.model is None

    def suspend(self) -> None:
        """Let the model go (its handle releases it) so another can take the memory; ``resume`` loads it again."""
        if self.model is None or self.handle is None:
            return
        self.param_bytes(), self.describe()  # kept: both read the loaded model
        self.model = None
        self.handle.release()

    def resume(self) -> bool:
        """Load the model again after ``suspend``; True when it had to be loaded."""
        if self.model is not None:
            return False
        self.model, self.tokenizer = self.handle.load()
        return True

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        pass  # the model belongs to its ModelHandle, which releases it

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

        if self._param_bytes is None:
            self._param_bytes = param_bytes(self.model)
        return self._param_bytes

    def memory(self) -> None:
        return None  # measured by the fresh-process probe (bench/memory.py)

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        if self._describe is None:
            self._describe = {
                "engine": f"transformers {transformers.__version__}", "batching": "static (one generate per batch)",
                "threads": torch.get_num_threads(), "dtype": str(next(self.model.parameters()).dtype).split(".")[-1]}
        return self._describe

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def generate(self, prompt_ids: list[list[int]], new_tokens: int) -> GenTiming:
        import torch

        device = next(self.model.parameters()).device
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, T)
        batch, plen = ids.shape
        clock = _Clock()
        self._sync()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=self._pad(), streamer=clock,
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
        steps_s = tuple(b - a for a, b in zip(clock.times[1:], clock.times[2:]))
        return GenTiming(batch_size=batch, prompt_tokens=plen, new_tokens=new_tokens, ttft_s=first - t0,
                         decode_s=last - first, total_s=t_end - t0, ttfts_s=(first - t0,) * batch,
                         itls_s=steps_s * batch)

    def _pad(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        """Stream the reply one token at a time (a piece per generated token; a token that ends inside a multi-byte
        character waits for the next). Closing the iterator early stops ``generate`` at its next step."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        ids = ids.to(next(self.model.parameters()).device)
        streamer = _token_streamer_class()(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stopped = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stopped.is_set(), dtype=torch.bool, device=input_ids.device)

        temperature = float(sampling.get("temperature", 0.0))
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      streamer=streamer, pad_token_id=self._pad(), do_sample=temperature > 0,
                      stopping_criteria=StoppingCriteriaList([_Stop()]))
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(sampling.get("top_p", 1.0)))
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:  # also on an early close (a stopped or timed-out chat): the generate thread ends at its next step
            stopped.set()
        thread.join()
        if errors:
            raise errors[0]


@lru_cache(maxsize=1)
def _token_streamer_class():
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        """``TextIteratorStreamer`` that emits every token's text as it comes (the stock one waits for a space)."""

        def put(self, value) -> None:
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):  # the token ends inside a multi-byte character: wait for the rest
                return
            piece = text[self.print_len:]
            if text.endswith("\n"):  # decode from a fresh cache after a line (as the stock streamer does)
                self.token_cache, self.print_len = [], 0
            else:
                self.print_len = len(text)
            self.on_finalized_text(piece)

    return TokenStreamer
