"""The ``distill`` stage: the teacher's top-k log-probs cached on disk, then the student trained on them within a
budget, then saved as an ordinary folder (settings: config.py; loss: loss.py; cache: topk.py; loop: train.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..stage import StageResult, by_family
from .config import ORIGINAL, DistillSettings

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext

__all__ = ["DistillStage"]

TEACHER_CACHE = "teacher-cache"  # <run folder>/checkpoints/<stage folder>/teacher-cache: kept for a resumed stage


class DistillStage(DistillSettings):
    """Distil a teacher (the original, or an earlier stage's model) into the current model.

    ```yaml
    - type: distill
      teacher: original          # or the `name:` of an earlier stage whose model teaches
      train: all                 # all (train_embeddings: false freezes the embeddings) | lora (r, alpha, ...)
      data: {source: builtin:mixed, samples: 512, seq_len: 256, skip_tokens: 0}   # or a list of sources
      top_k: 64                  # the teacher's top-k log-probs + the rest's mass per token; null: full logits
      cache_dtype: float16       # the cached log-probs' dtype (float32 for KLs below ~1e-3)
      temperature: 1.0
      hidden_weight: 0.0         # > 0: + MSE between last hidden states (equal hidden sizes)
      budget: {minutes: 20}      # or {tokens: 200000} or {steps: 300}
      lr: 1.0e-4
      schedule: cosine           # over the budget (minutes: over elapsed time / budget)
      warmup_steps: 0
      batch_size: 8
      grad_accum: 1
      max_grad_norm: 1.0
      weight_decay: 0.0
      precision: auto            # fp32 master weights; bf16 autocast when the run's dtype is bfloat16
      held_out: {source: builtin:pydoc, tokens: 2048, every: 50}
      checkpoint_every: null
      seed: null
    ```

    The teacher runs once, before the student loads, over every training sequence (and the held-out windows); its
    top-k log-probs go to ``<run folder>/checkpoints/<stage folder>/teacher-cache`` (reused when a killed stage
    resumes, removed when it ends). Result: tokens, steps, tokens/s, the loss curve and the held-out curve
    (``plots/distill.png``).
    """

    def preflight(self, base_dir: "Path | None" = None) -> None:
        from ..data.calibration import check_calibration, check_text_file

        for source in self.data_sources:
            check_calibration(source, base_dir)
        if self.held_out is not None and not self.held_out.source.startswith("builtin:"):
            check_text_file(self.held_out.source, base_dir, f"held_out.source `{self.held_out.source}`")
        if self.train == "lora":
            from ..errors import require

            require("peft", "lora", "The distill stage with `train: lora`")

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from ..utils.io import stable_hash
        from .student import check_student, load_student, save_student
        from .train import train_loop_

        t0 = time.perf_counter()
        where = f"stages[{ctx.stage_index}] (distill)"
        self.preflight(ctx.recipe.base_dir)
        teacher = self._teacher_handle(ctx)
        check_student(self, ctx.current, teacher, where)
        seed = ctx.runtime.seed if self.seed is None else self.seed
        key = stable_hash([ctx.fingerprint, str(teacher.path), teacher.fingerprint(), ctx.current.fingerprint()])
        data, held_out, cache, cache_info = self._teacher_cache(ctx, teacher, key)
        model, tokenizer, info = load_student(self, ctx, seed)
        t_train = time.perf_counter()
        pos = train_loop_(model, data, cache, self, ctx, seed, held_out, key)
        train_wall = time.perf_counter() - t_train
        extra = {"teacher": self.teacher, "tokens_trained": pos.tokens, "steps": pos.step}
        save_student(model, tokenizer, self, ctx, extra)
        cache.remove()
        if held_out is not None:
            held_out.cache.remove()
        data_out = self._figures(pos, data, info, cache_info, train_wall, teacher)
        data_out["seconds_total"] = round(time.perf_counter() - t0, 3)
        return StageResult(type="distill", label=self.label, model_dir="model", data=data_out,
                           summary=self._summary(data_out))

    # -----------------------------------------------------------------------------------------------------------------

    def _teacher_handle(self, ctx: "RunContext") -> "ModelHandle":
        """The original, or the model folder of the earlier stage ``teacher`` names."""
        from ..context import ModelHandle
        from ..pipeline import stage_dir_name

        if self.teacher == ORIGINAL:
            return ctx.original
        i = self.teacher_index(ctx.recipe.stages, ctx.stage_index)
        result = ctx.results.get(i) if i is not None else None
        if result is None or not result.model_dir:
            raise RecipeError(f"stages[{ctx.stage_index}] (distill): `teacher: {self.teacher}` names no earlier "
                              "stage that wrote a model. Fix: `teacher: original`, or the name of such a stage")
        path = ctx.run_dir / stage_dir_name(i, ctx.recipe.stages[i]) / result.model_dir
        return ModelHandle("teacher", path, ctx.runtime)

    def _teacher_cache(self, ctx: "RunContext", teacher: "ModelHandle", key: str) -> tuple[Any, Any, Any, dict]:
        """Training data, held-out windows and the teacher's caches on both: reused when a killed run left them
        whole for this key, else written now (the teacher loads, writes, and is released)."""
        import torch
        from transformers import AutoTokenizer

        from ..data.calibration import load_sources
        from ..lora.data import TrainData
        from .heldout import HeldOut, held_out_windows
        from .topk import TopKLogits

        t = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(ctx.current.path))
        with ctx.task("distill: data"):
            ids = load_sources(self.data, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (samples, seq_len)
        data = TrainData(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
        windows = (held_out_windows(self.held_out, tokenizer, self.seq_len, ctx.recipe.base_dir)
                   if self.held_out is not None else None)
        root = ctx.checkpoint_dir / TEACHER_CACHE
        cache = TopKLogits.open(root / "train", key)
        held = TopKLogits.open(root / "held-out", key) if windows is not None else None
        reused = cache is not None and (windows is None or held is not None)
        if not reused:
            model = ctx.load(teacher) if teacher is ctx.original else _load_alone(ctx, teacher)
            model = model[0]
            kw = {"top_k": self.top_k, "hidden": self.hidden_weight > 0, "batch_size": self.batch_size, "key": key,
                  "dtype": self.cache_dtype}
            with ctx.task("distill: teacher top-k", total=len(data)) as advance:
                cache = TopKLogits.write(root / "train", model, data.input_ids, data.attention_mask,
                                         temperature=self.temperature, progress=advance, **kw)
            if windows is not None:
                held = TopKLogits.write(root / "held-out", model, windows, torch.ones_like(windows),
                                        temperature=1.0, **{**kw, "hidden": False})
            del model
            teacher.release()
            ctx.original.release()
        else:
            ctx.log(f"distill: the teacher's cache from the killed run is whole: reused ({root})")
        held_out = HeldOut(windows, held, self.held_out.every) if windows is not None else None
        info = {"cache_bytes": cache.nbytes + (held.nbytes if held is not None else 0),
                "cache_seconds": round(time.perf_counter() - t, 3), "cache_reused": reused}
        return data, held_out, cache, info

    def _figures(self, pos: Any, data: Any, info: dict, cache_info: dict, train_wall: float,
                 teacher: "ModelHandle") -> dict:
        steps = len(pos.losses)
        k = max(1, min(5, steps // 4))
        data_tokens = int(data.attention_mask.sum())
        bf16 = self.precision == "bf16" or (self.precision == "auto" and teacher.runtime.dtype == "bfloat16")
        out = {
            "teacher": self.teacher, "teacher_path": str(teacher.path), "train": self.train,
            "top_k": self.top_k, "temperature": self.temperature, "hidden_weight": self.hidden_weight,
            "precision": "fp32 weights, bf16 autocast" if bf16 else "fp32",
            "budget": {self.budget.kind: getattr(self.budget, self.budget.kind)},
            "tokens_trained": pos.tokens, "steps": pos.step, "train_seconds": round(pos.seconds, 3),
            "minutes": round(pos.seconds / 60, 3), "tokens_per_second": round(pos.tokens / max(pos.seconds, 1e-9), 2),
            "train_wall_seconds_this_process": round(train_wall, 3),
            "data_sequences": len(data), "data_tokens": data_tokens,
            "data_sources": [{"source": d.source, "samples": d.samples, "tokens": d.tokens} for d in self.data_sources],
            "epochs": round(pos.tokens / max(data_tokens, 1), 3),
            "loss_first": sum(pos.losses[:k]) / k if steps else None,
            "loss_last": sum(pos.losses[-k:]) / k if steps else None,
            "loss_curve": pos.losses, "lr_curve": pos.lrs,
            "held_out_curve": pos.held_out,
            "teacher_cache_bytes": cache_info["cache_bytes"], "teacher_cache_seconds": cache_info["cache_seconds"],
            "teacher_cache_reused": cache_info["cache_reused"],
            **info,
        }
        if pos.tokens > data_tokens:
            out["data_notes"] = [f"the budget outlasted the data: {out['epochs']:.2f} passes over its "
                                 f"{data_tokens:,} tokens (cycled, reshuffled each pass)"]
        return out

    def _summary(self, d: dict) -> dict:
        out = {"teacher": self.teacher, "train": self.train,
               "loss": f"{d['loss_first']:.4g} -> {d['loss_last']:.4g}" if d["steps"] else "-",
               "tokens": f"{d['tokens_trained']:,} in {d['steps']} steps ({d['epochs']:.2f} passes)",
               "time": f"{d['minutes']:.1f} min, {d['tokens_per_second']:.0f} tok/s",
               "teacher cache": f"{d['teacher_cache_bytes'] / 2**20:.1f} MiB, {d['teacher_cache_seconds']:.0f}s"}
        curve = d["held_out_curve"]
        if curve:
            out["held-out"] = (f"ppl {curve[0]['perplexity']:.4g} -> {curve[-1]['perplexity']:.4g}, "
                               f"KL {curve[0]['kl']:.4g} -> {curve[-1]['kl']:.4g}")
        return out


def _load_alone(ctx: "RunContext", handle: "ModelHandle") -> tuple[Any, Any]:
    """An earlier stage's model as the teacher, with the run's models released first (one model in memory)."""
    ctx.original.release()
    ctx.current.release()
    return handle.load()
