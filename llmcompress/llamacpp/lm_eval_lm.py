"""lm-eval over llama.cpp's full logits, in this process: loglikelihood, rolling loglikelihood and greedy generation.

lm-eval's own ``gguf`` model talks to a llama-cpp-python *server* and scores continuations from its top-10
``logprobs`` with ``echo``; it has no ``loglikelihood_rolling``, so perplexity tasks (``pydoc_ppl``, wikitext) do not
run on it. This LM scores every token from the full distribution, as lm-eval's HFLM does for transformers models,
with the same tokenizer, so a task's requests are the same token ids for the original and the GGUF.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class LlamaCppLM(TemplateLM):
    def __init__(self, model: Any, tokenizer: Any):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length = model.n_ctx

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:  # lm-eval keys its request cache by it when a chat template is applied
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt in the tokenizer's chat template (the evaluate stage's ``apply_chat_template``), as HFLM does."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        import numpy as np

        whole = (context + continuation)[-(self.max_length + 1):]
        inputs = whole[:-1]
        logits = self.model.row_logits(inputs)[-len(continuation):]  # (n, V): positions predicting continuation
        logits = logits - logits.max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = logprobs[np.arange(len(continuation)), continuation]
        greedy = bool((logprobs.argmax(-1) == np.array(continuation)).all())
        return float(picked.sum()), greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in requests:
            result = self._score(context, continuation)
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, args in [req.args for req in requests]:
            until = args.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = min(int(args.get("max_gen_toks", 256)), self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_tokens):]  # the prompt's end, room for the reply
            text = self.model.greedy_text(ids, max_tokens, stop=until)
            for stop in until:  # lm-eval's models cut at the first stop sequence
                text = text.split(stop)[0]
            out.append(text)
        return out
