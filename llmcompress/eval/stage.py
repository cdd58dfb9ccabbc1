"""The evaluate stage: lm-eval tasks, sliding-window perplexity, KL divergence and chat answers, original vs
compressed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field, field_validator, model_validator

from ..serving.config import VLLMConfig
from ..data.images import ImageDataConfig
from ..stage import StageConfig, StageResult, by_family
from .chat import ChatConfig
from .perplexity import PerplexityConfig

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext
    from .harness import PromptOptions

#: Bump when a change here changes the figures, so cached original results are recomputed.
#: 3: the cached results carry lm-eval's own results JSON (written beside result.json).
EVAL_VERSION = 3
_LM_EVAL = "lm_eval"  # lm-eval's own results in a model's results while it runs: a file of its own in the stage folder
_RESERVED = ("perplexity", "kl", "chat", _LM_EVAL)  # keys beside the task names in each model's results


class EvaluateStage(StageConfig):
    """Evaluate the current model against the original: lm-eval tasks, perplexity, KL divergence and chat answers.

    The original's results are cached across runs (same model, settings and versions), so a recipe sweep pays for
    them once. With the defaults, SmolLM2-135M in float32 on one (shared) CPU thread takes about a minute for the
    original and two for a compressed copy (KL runs both models); bfloat16 on a CPU without native bf16 is ~6x slower.
    `limit` is a smoke-test size (acc stderr ~0.12): perplexity and KL are the sensitive figures; for accuracy
    claims set `limit: null`. `chat: {}` has both models answer the shipped prompts (facts, arithmetic, instructions)
    with their chat template, greedy, and counts the flips: prompts the original answers right and the compressed
    model wrong (see ``chat.py``).

    lm-eval's own results (what ``simple_evaluate`` returns: per-task configs, versions, n-shot, higher_is_better,
    and the prompt format as its CLI records it) are kept beside ``result.json`` as ``lm-eval-original.json`` and
    ``lm-eval-compressed.json`` (the latter only when an earlier stage changed the model); ``log_samples: true`` adds
    every item's prompt, output and score. ``apply_chat_template``, ``fewshot_as_multiturn`` and ``system_instruction``
    are lm-eval's options of those names, passed to it as they are (and part of the key of the original's cached
    results). With hub access, ``tasks: [wikitext]`` runs lm-eval's wikitext-2 task (word_perplexity, byte_perplexity,
    bits_per_byte over whole documents): the figure lm-eval users publish; offline it fails before any weights load.

    ```yaml
    - type: evaluate
      tasks: [pydoc_ppl, pydoc_cloze]   # local tasks (llmcompress/evals/); with hub access any lm-eval task
      limit: 16                         # items per task; null = all
      num_fewshot: 0
      batch_size: 8
      apply_chat_template: false        # true: prompts in the tokenizer's chat template; or a template's name
      fewshot_as_multiturn: null        # few-shot examples as chat turns; null = as apply_chat_template (lm-eval CLI)
      system_instruction: null          # a system message (or, without a template, text before each prompt)
      log_samples: false                # every item's prompt, output and score in lm-eval-<model>.json
      perplexity: {corpus: builtin:pydoc, ctx_len: 512, stride: 256, max_tokens: 2048}  # null to skip
      kl: true                          # KL(original || compressed) on the perplexity windows
      backend: hf                       # vllm: tasks through lm-eval's vllm model (`llmcompress setup vllm`)
      chat: null                        # {} = greedy chat replies to builtin:chat, flips vs the original
    ```
    """

    type: Literal["evaluate"] = "evaluate"
    tasks: list[str] = Field(
        default_factory=lambda: ["pydoc_ppl", "pydoc_cloze"],
        description="lm-eval task names: local tasks in llmcompress/evals/ (offline), or with hub access any lm-eval "
        "task (`wikitext`: wikitext-2 perplexity, comparable to published figures). May be empty to measure "
        "perplexity only.",
    )
    limit: int | None = Field(
        16, ge=1, description="Items per task (the first N of each task's test split; data files are shuffled). "
        "null = all items (pydoc_ppl: 150, pydoc_cloze: 250).",
    )
    num_fewshot: int = Field(0, ge=0, description="Few-shot examples per item (perplexity tasks always use 0).")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size.")
    apply_chat_template: bool | str = Field(
        False, description="lm-eval's `apply_chat_template`: true formats every prompt with the tokenizer's chat "
        "template; a string names one of the tokenizer's templates. Off by default, as in lm-eval.",
    )
    fewshot_as_multiturn: bool | None = Field(
        None, description="lm-eval's `fewshot_as_multiturn`: few-shot examples as user/assistant turns. Needs "
        "`apply_chat_template`; null = on with a chat template, off without (as lm-eval's CLI).",
    )
    system_instruction: str | None = Field(
        None, min_length=1, description="lm-eval's `system_instruction`: a system message with a chat template, "
        "else text before every prompt.",
    )
    log_samples: bool = Field(
        False, description="Keep lm-eval's per-sample records (document, prompt, model output, score) in each "
        "model's lm-eval results file (lm-eval-<model>.json in the stage folder).",
    )
    perplexity: PerplexityConfig | None = Field(
        default_factory=PerplexityConfig,
        description="Sliding-window perplexity on a corpus (default: 2048 tokens of Python's docs); null to skip.",
    )
    kl: bool = Field(
        True, description="KL(original || compressed) and top-1 agreement on the perplexity windows "
        "(needs `perplexity`; both models in memory)."
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Engine for the lm-eval tasks: hf = transformers in this process (lm-eval's HFLM); "
        "vllm = lm-eval's `vllm` model type on the model folder, in the vLLM environment "
        "(`llmcompress setup vllm`). Perplexity and KL always run under transformers (they need full logits)."
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (backend vllm).")
    data: ImageDataConfig | None = Field(
        None, description="Vision models only: the images to evaluate on (default builtin:digits, test split).")
    chat: ChatConfig | None = Field(
        None, description="Chat answers: both models reply to a prompt set (chat template, greedy); the report "
        "gives each model's correct answers and the compressed model's flips (right before, wrong after). "
        "`{}` = the shipped set; null = off. Always under transformers (or the model's own engine: llama.cpp).",
    )

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, v: list[str]) -> list[str]:
        seen = set()
        for name in v:
            if name in _RESERVED:
                raise ValueError(f"a task may not be named `{name}` (a reserved result key)")
            if name in seen:
                raise ValueError(f"task `{name}` is listed twice")
            seen.add(name)
        return v

    @field_validator("apply_chat_template")
    @classmethod
    def _template_name(cls, v: bool | str) -> bool | str:
        if isinstance(v, str) and not v.strip():
            raise ValueError("`apply_chat_template` is an empty string. Fix: true (the tokenizer's template), false, "
                             "or the name of one of the tokenizer's chat templates")
        return v

    @model_validator(mode="after")
    def _something_to_do(self) -> "EvaluateStage":
        if not self.tasks and self.perplexity is None and self.chat is None:
            raise ValueError("nothing to evaluate: `tasks` is empty, `perplexity` is null and `chat` is off. "
                             "Fix: set one of them")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("`fewshot_as_multiturn: true` needs `apply_chat_template` (lm-eval turns few-shot "
                             "examples into chat turns of the template). Fix: set `apply_chat_template: true`, or "
                             "remove `fewshot_as_multiturn`")
        lm_eval_only = {k: getattr(self, k) for k in ("apply_chat_template", "fewshot_as_multiturn",
                                                      "system_instruction", "log_samples")}
        if not self.tasks and any(v not in (None, False) for v in lm_eval_only.values()):
            given = next(k for k, v in lm_eval_only.items() if v not in (None, False))
            raise ValueError(f"`{given}` applies to lm-eval tasks, and `tasks` is empty. Fix: list tasks, or "
                             f"remove `{given}`")
        if self.vllm != VLLMConfig() and self.backend != "vllm":  # defaults (`vllm: {}`, a resolved recipe) pass
            raise ValueError("`vllm:` settings apply to `backend: vllm` only, and this stage's backend is "
                             f"{self.backend}. Fix: set `backend: vllm`, or remove the `vllm:` block.")
        return self

    def preflight(self, base_dir: "Path | None" = None) -> None:
        """lm-eval installed; every task known and, for hub tasks, the hub reachable (fails in <= 2 s); the files it
        reads exist (the chat prompts are read and checked row by row)."""
        where = f"stages (evaluate{': ' + self.name if self.name else ''})"
        if self.chat is not None:
            from .chat import BUILTIN_PROMPTS, load_prompts

            prompts = self.chat.prompts
            if prompts in BUILTIN_PROMPTS or base_dir is not None or Path(prompts).expanduser().is_absolute():
                load_prompts(self.chat, base_dir)  # every row checked now: a bad file fails before weights load
        corpus = self.perplexity.corpus if self.perplexity is not None else "builtin:"
        if not corpus.startswith("builtin:") and (base_dir is not None or Path(corpus).expanduser().is_absolute()):
            from .perplexity import load_corpus

            load_corpus(corpus, base_dir)  # read as the stage will: a missing, binary or empty file fails now
        if self.data is not None:
            from ..data.images import check_data

            check_data(self.data, base_dir, None, f"{where}: data")
        if self.tasks:
            from ..errors import require
            from .harness import check_tasks

            require("lm_eval", "eval", "The evaluate stage")
            check_tasks(self.tasks, where=where)
            if self.backend != "hf":  # an engine that needs its own install says so now (vLLM's environment)
                from ..backends import BACKENDS

                BACKENDS.get(self.backend).preflight(f"{where}: backend {self.backend}")

    # -----------------------------------------------------------------------------------------------------------------

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        t0 = time.perf_counter()
        self.preflight(ctx.recipe.base_dir)
        if self.backend == "vllm" and self.tasks:  # before any model runs: a refusal costs nothing
            from ..serving.support import require_servable

            for handle in (ctx.original, ctx.current):
                require_servable(handle.path, ctx.runtime.device, f"backend vllm cannot evaluate the {handle.role} "
                                 "model here", dtype=ctx.runtime.dtype)
        text = self._corpus_text(ctx)  # file errors surface before any weights load
        rows = self._chat_rows(ctx)
        settings = self._settings(ctx, text, rows)
        windows: dict[str, Any] = {}  # built once (needs a tokenizer), shared by both models
        # The original's logits on the windows, for KL without both models in memory (cached with its results)
        store = ctx.baseline_path("evaluate-logits", {**settings, "notes": None, "version": EVAL_VERSION}, "")
        original, compressed, timing, same = measure_both(
            ctx, "evaluate", settings, EVAL_VERSION,
            lambda handle, timing, reference: self._evaluate(ctx, handle, text, windows, timing, reference=reference,
                                                             rows=rows, store=store))
        self._write_lm_eval(ctx, original, compressed, same)
        if rows is not None and not same:
            from .chat import compare

            compressed["chat"] = {**compressed["chat"], **compare(rows, original["chat"], compressed["chat"])}
        if timing["original"]["cached"]:
            ctx.log("evaluate: original results reused from the cache")
        for role, t in timing.items():  # another engine (a GGUF file: llama.cpp) is named
            if isinstance(t, dict) and t.get("engine"):
                chat = ", chat replies from its own greedy generation" if rows is not None else ""
                settings["notes"].append(f"the {role} model ran on {t['engine']['engine']} (its tasks, perplexity "
                                         f"and KL from that engine's full logits{chat}; the other model's on "
                                         "transformers)")
        if not settings["notes"]:
            del settings["notes"]
        data = {"settings": settings, "original": original, "compressed": compressed, "timing": timing}
        return StageResult(type="evaluate", label=self.label, seconds=time.perf_counter() - t0, data=data,
                           summary=summarize(original, compressed, same=same))

    @staticmethod
    def _write_lm_eval(ctx: "RunContext", original: dict, compressed: dict, same: bool) -> None:
        """Move lm-eval's own results out of each model's figures into ``lm-eval-<model>.json`` in the stage folder."""
        from ..utils.io import atomic_write_json

        for role, results in (("original", original), ("compressed", compressed)):
            raw = results.pop(_LM_EVAL, None)
            if raw is not None and not (same and role == "compressed"):
                atomic_write_json(ctx.stage_dir / f"lm-eval-{role}.json", raw)

    def prompt_options(self) -> "PromptOptions":
        """lm-eval's prompt options as this stage sets them (``fewshot_as_multiturn`` null: as lm-eval's CLI)."""
        from .harness import PromptOptions

        multiturn = self.fewshot_as_multiturn
        return PromptOptions(
            apply_chat_template=self.apply_chat_template, system_instruction=self.system_instruction,
            fewshot_as_multiturn=bool(self.apply_chat_template) if multiturn is None else multiturn,
            log_samples=self.log_samples,
        )

    def _settings(self, ctx: "RunContext", text: str | None, rows: list | None = None) -> dict[str, Any]:
        """How the figures were measured; all but ``notes`` also key the cache of the original's results.

        The fingerprints identify the task data, the corpus text (which varies with the Python version) and the chat
        prompts used.
        """
        from dataclasses import asdict

        from .chat import prompts_fingerprint
        from .tasks import tasks_fingerprint
        from .perplexity import text_fingerprint

        notes = []
        if self.kl and self.perplexity is None:
            notes.append("KL skipped: it is computed on the perplexity windows and `perplexity` is null")
        return {
            "tasks": list(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "batch_size": self.batch_size,
            "tasks_fingerprint": tasks_fingerprint(self.tasks) if self.tasks else None,
            **(asdict(self.prompt_options()) if self.tasks else {}),  # lm-eval's chat template options, as passed
            "perplexity": self.perplexity.model_dump() if self.perplexity else None,
            "corpus_fingerprint": text_fingerprint(text) if text is not None else None,
            "kl": self.kl and self.perplexity is not None,
            # tasks through lm-eval's HFLM (hf) or its vllm model type (vllm); perplexity/KL always transformers
            "backend": self.backend,
            **({"vllm": self.vllm.model_dump()} if self.backend == "vllm" else {}),
            # chat replies: greedy, always under transformers (or the model's own engine), never through vllm
            **({"chat": self.chat.model_dump(), "chat_fingerprint": prompts_fingerprint(rows)} if rows else {}),
            **ctx.runtime.describe(),
            "notes": notes,
        }

    def _corpus_text(self, ctx: "RunContext") -> str | None:
        from .perplexity import load_corpus

        return load_corpus(self.perplexity.corpus, ctx.recipe.base_dir) if self.perplexity else None

    def _chat_rows(self, ctx: "RunContext") -> list | None:
        from .chat import load_prompts

        return load_prompts(self.chat, ctx.recipe.base_dir) if self.chat is not None else None

    def _evaluate(
        self,
        ctx: "RunContext",
        handle: "ModelHandle",
        text: str | None,
        windows: dict,
        timing: dict,
        reference: "ModelHandle | None" = None,
        rows: list | None = None,
        store: Path | None = None,
    ) -> dict[str, Any]:
        """Tasks, chat replies to ``rows``, then perplexity (and KL against ``reference`` when given) for one model;
        seconds go to ``timing``. One model is in memory at a time: KL reads the original's logits from ``store``,
        which the original's own pass writes (or, when its results came from the cache without it, a pass of the
        original alone before this model loads)."""
        from .harness import clean_results, evaluate_tasks
        from .perplexity import check_context, make_windows, perplexity

        n_windows = 0
        if text is not None or rows is not None or self.backend == "hf":
            model, tokenizer = ctx.load(handle)
            if callable(getattr(model, "describe", None)):  # not a transformers model: its engine tells what it is
                timing["engine"] = model.describe()
        if text is not None:
            check_context(model, self.perplexity)
            if "w" not in windows:
                windows["w"] = make_windows(tokenizer, text, self.perplexity)
            n_windows = len(windows["w"].spans)
        out: dict[str, Any] = {}
        n_chat = len(rows) if rows is not None else 0
        with ctx.task(f"evaluate {handle.role}", total=len(self.tasks) + n_chat + n_windows) as advance:
            t = time.perf_counter()
            if self.tasks:
                args = (self.tasks, self.limit, self.num_fewshot, self.batch_size)
                if self.backend == "vllm":
                    from .vllm import run_tasks_vllm

                    log = ctx.run_dir / "logs" / f"lm-eval-vllm-{ctx.stage_index:02d}-{handle.role}.log"
                    ctx.log(f"evaluate: {handle.role} tasks through lm-eval's vllm model (log: {log})")
                    raw = run_tasks_vllm(handle.path, ctx.runtime, self.vllm, *args, log_path=log,
                                         where=f"{handle.role} model, backend vllm", options=self.prompt_options())
                    advance(len(self.tasks))
                else:
                    raw = evaluate_tasks(model, tokenizer, *args, progress=advance, options=self.prompt_options())
                out.update(clean_results(raw["results"]))
                out[_LM_EVAL] = raw  # written to the stage folder by `run` (and cached with the original's figures)
                timing["tasks_s"] = round(time.perf_counter() - t, 3)
            if rows is not None:
                from .chat import answer_all, model_results

                t = time.perf_counter()
                out["chat"] = model_results(rows, answer_all(model, tokenizer, rows, self.chat, advance))
                timing["chat_s"] = round(time.perf_counter() - t, 3)
            if text is None:
                return out
            t = time.perf_counter()
            kl = self.kl and store is not None and ctx.current is not ctx.original
            if reference is not None and kl:
                from . import reference as logits
                from .kl import compare

                if logits.read_index(store, windows["w"]) is None:
                    ctx.log(f"evaluate: the original's logits for KL (the original alone in memory; {store})")
                    del model
                    logits.write(store, ctx.load(reference)[0], windows["w"])
                    model = ctx.load(handle)[0]
                    t = time.perf_counter()
                result = compare(store, model, windows["w"], advance)
                out["perplexity"], out["kl"] = result.perplexity, result.kl
                timing["perplexity_kl_s"] = round(time.perf_counter() - t, 3)
            elif kl:
                from . import reference as logits

                out["perplexity"] = logits.write(store, model, windows["w"], advance)  # and its logits for KL
                timing["perplexity_s"] = round(time.perf_counter() - t, 3)
            else:
                out["perplexity"] = perplexity(model, windows["w"], advance)
                timing["perplexity_s"] = round(time.perf_counter() - t, 3)
        return out


def measure_both(ctx: "RunContext", kind: str, settings: dict, version: int,
                 evaluate: Callable[["ModelHandle", dict, "ModelHandle | None"], dict],
                 ) -> tuple[dict, dict, dict, bool]:
    """``(original, compressed, timing, same)``: the original's results (cached across runs by ``settings`` but its
    ``notes``, and ``version``) and the current model's, from ``evaluate(handle, timing, reference)`` (``reference``:
    the original, for divergence figures; None for the original itself)."""
    timing: dict[str, dict[str, Any]] = {"original": {"cached": True}}

    def compute_original() -> dict:
        timing["original"]["cached"] = False
        return evaluate(ctx.original, timing["original"], None)

    t = time.perf_counter()
    key = {**{k: v for k, v in settings.items() if k != "notes"}, "version": version}
    original = ctx.baseline(kind, key, compute_original)
    timing["original"]["seconds"] = round(time.perf_counter() - t, 3)
    same = ctx.current is ctx.original
    if same:
        compressed = dict(original)
        settings["notes"].append("no earlier stage changed the model: `compressed` repeats the original's figures")
    else:
        t = time.perf_counter()
        timing["compressed"] = {}
        compressed = evaluate(ctx.current, timing["compressed"], ctx.original)
        timing["compressed"]["seconds"] = round(time.perf_counter() - t, 3)
    return original, compressed, timing, same


def primary_metrics(results: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """One headline metric per task: its first metric that is not a stderr or a count."""
    out = {}
    for task, metrics in results.items():
        if task in _RESERVED or not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            if not name.endswith("_stderr") and "_stderr," not in name and name != "samples":
                out[task] = (name, value)
                break
    return out


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _change(a: float, b: float) -> str:
    return f"{_fmt(a)} -> {_fmt(b)} ({(b - a) / a * 100:+.1f}%)" if a else f"{_fmt(a)} -> {_fmt(b)}"


def summarize(original: dict, compressed: dict, same: bool) -> dict[str, str]:
    """Short strings for the run summary: each task's headline metric, perplexity, KL and chat answers, original ->
    compressed."""
    fmt: Callable[[float, float], str] = (lambda a, b: f"{_fmt(a)} (original only)") if same else _change
    out = {}
    comp = primary_metrics(compressed)
    for task, (metric, value) in primary_metrics(original).items():
        if task in comp:
            err = original[task].get(f"{metric}_stderr")
            out[f"{task} {metric}"] = fmt(value, comp[task][1]) + (f" ±{err:.2g}" if err else "")
    if "perplexity" in original and "perplexity" in compressed:
        out["perplexity"] = fmt(original["perplexity"]["perplexity"], compressed["perplexity"]["perplexity"])
    if "kl" in compressed:
        kl = compressed["kl"]
        out["KL"] = f"mean {kl['kl_mean']:.4f} nats, p95 {kl['kl_p95']:.4f}; top-1 agree {kl['top1_agreement']:.1%}"
    if "chat" in original and "chat" in compressed:
        from .chat import summary_line

        out["chat"] = summary_line(original["chat"], None if same else compressed["chat"])
    return out

