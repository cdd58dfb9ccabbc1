"""Build the report dict (what ``report.json`` holds) from the recipe, the environment and the stage results.

Shape (``None`` where a part was not measured)::

    {"format": "llmcompress-report", "version": 1, "name", "method", "same_model", "headline", "notes": [...],
     "recipe": {...}, "environment": {...},
     "models": {"original":   {"path", "description", "size_bytes", "meta", "eval": {task: {metric: v}},
                               "chat": {"n", "n_with_answer", "correct", "accuracy", "by_kind"} | None,
                               "bench": {figure: v}, "measured_with": {"eval": {...} | None, "bench": {...} | None}},
                "compressed": {... same ..., "kl": {...}}},
     "comparison": {"size": {...}, "eval": {"measured_with", "metrics": {task: {metric: entry}}} | None,
                    "kl": {"measured_with", "metrics": {name: {"value", "better"}}} | None,
                    "chat": {"measured_with", "accuracy": entry | None, "flips", "gains", "identical",
                             "exact_agreement", "diverged", "mean_first_divergence", "flipped": [...],
                             "gained": [...]} | None,
                    "bench": {"measured_with", "figures": {figure: entry}} | None, "headline": {...}},
     "stages": [{"index", "dir", "type", "label", "seconds", "peak_rss_bytes", "peak_gpu_bytes", "resumed",
                 "model_dir", "config", "summary", "data"}]}

Entries come from ``metrics.compare``: original, compressed, better ("lower"/"higher"), delta, relative, verdict,
change (words), plus recovery/stderr for accuracies and ratio/speedup for benchmark figures.

Chat answers (an evaluate stage with ``chat:``; ``llmcompress.eval.chat``): ``models.<role>.chat`` holds each model's
counts (``by_kind``: ``{kind: {"n_with_answer", "correct", "accuracy"}}``); ``comparison.chat`` the compressed model
against the original: flips (right before, wrong after) and gains (wrong before, right after) with the items
(``{"index", "kind", "prompt", "answer", "original", "compressed"}``), the share of replies identical to the
original's, and the mean index of the first differing token over the replies that differ. Every reply (text and
token ids) stays in the stage's ``data``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import metrics as M
from .lora import loss_curves as lora_loss_curves
from .lora import merge_modes as lora_merge_modes
from .lora import recovery as lora_recovery

FORMAT, VERSION = "llmcompress-report", 1
#: Environment keys that describe the hardware and runtime a figure was measured on.
_RUNTIME_KEYS = ("device", "gpu", "cpu", "cpu_count", "threads", "dtype")
#: Preferred headline metrics, in order: (task or None for any, metric).
_PPL_PREFERENCE = [("perplexity", "perplexity"), (None, "perplexity"), (None, "word_perplexity")]
_ACC_PREFERENCE = ["acc", "acc_norm", "exact_match"]
#: Vision runs (no perplexity): quality is detection mAP, else top-1 accuracy; speed is images/s.
_VISION_QUALITY = ["map", "acc"]
#: Chat figures copied from the evaluate stage into the report (each reply's text and ids stay in the stage data).
_CHAT_MODEL_KEYS = ("n", "n_with_answer", "correct", "accuracy", "by_kind")
_CHAT_COMPARE_KEYS = ("flips", "gains", "identical", "exact_agreement", "diverged", "mean_first_divergence",
                      "flipped", "gained")


def build_report(recipe: Any, environment: dict, stages: list[dict], original: dict, compressed: dict | None) -> dict:
    """Assemble the report of one run (plain JSON: no NaN, no objects).

    Args:
        recipe: the ``Recipe`` (or its dict) that ran.
        environment: device, threads, dtype, versions, times (see ``Runtime.describe`` plus the pipeline's extras).
        stages: ``{"index", "dir", "config", "result", "resumed"}`` per stage, in order.
        original: ``{"path", "size_bytes", "description", "meta"}`` of the original model.
        compressed: the same for the final model; equal to ``original`` (or None) when nothing changed the model.
    """
    recipe_d = recipe.model_dump(mode="json", exclude_none=True) if hasattr(recipe, "model_dump") else dict(recipe)
    environment = dict(environment or {})
    same = compressed is None or compressed == original or _same_path(original, compressed)
    compressed = original if compressed is None else compressed
    stage_list = [_stage_entry(i, s) for i, s in enumerate(stages)]
    evaluate, benchmark = _last(stage_list, "evaluate"), _last(stage_list, "benchmark")

    models = {
        role: _model_entry(role, info, evaluate, benchmark, environment)
        for role, info in (("original", original), ("compressed", compressed))
    }
    comparison = _comparison(models, evaluate, benchmark)
    comparison["recovery"], comparison["merges"] = lora_recovery(stage_list), lora_merge_modes(stage_list)
    comparison["lora_loss"] = lora_loss_curves(stage_list)  # plots/lora-loss.png
    report = {
        "format": FORMAT,
        "version": VERSION,
        "name": recipe_d.get("name", "run"),
        "method": _method(stage_list, compressed, same),
        "same_model": same,
        "recipe": recipe_d,
        "environment": environment,
        "models": models,
        "comparison": comparison,
        "stages": stage_list,
    }
    report["headline"] = headline_text(report)
    report["notes"] = _notes(report, stage_list)
    return sanitize(report)


# ---------------------------------------------------------------------------------------------------------------------
# Parts


def _same_path(a: dict, b: dict) -> bool:
    pa, pb = a.get("path"), b.get("path")
    return bool(pa and pb) and Path(pa).resolve() == Path(pb).resolve()


def _stage_entry(position: int, stage: dict) -> dict:
    result = stage.get("result") or {}
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    config = stage.get("config") or {}
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json", exclude_none=True)
    # a stage may say which settings it applied (vision stages: their own defaults, not the LLM ones)
    config = (result.get("data") or {}).get("applied_config") or config
    return {
        "index": stage.get("index", position),
        "dir": stage.get("dir"),
        "type": result.get("type") or config.get("type") or "unknown",
        "label": result.get("label") or config.get("name") or config.get("type") or "stage",
        "seconds": result.get("seconds"),
        "peak_rss_bytes": result.get("peak_rss_bytes"),
        "peak_gpu_bytes": result.get("peak_gpu_bytes"),
        "resumed": bool(stage.get("resumed", False)),
        "model_dir": result.get("model_dir"),
        "config": config,
        "summary": result.get("summary") or {},
        "data": result.get("data") or {},
    }


def _last(stages: list[dict], kind: str) -> dict | None:
    found = [s for s in stages if s["type"] == kind]
    return found[-1] if found else None


def _runtime(environment: dict) -> dict:
    return {k: environment[k] for k in _RUNTIME_KEYS if environment.get(k) is not None}


def _measured_with(stage: dict | None, environment: dict) -> dict | None:
    """Settings of the stage on top of the runtime (the stage's own values win), plus where they came from."""
    if stage is None:
        return None
    return {**_runtime(environment), **(stage["data"].get("settings") or {}), "stage": stage["dir"] or stage["label"]}


def _model_entry(role: str, info: dict, evaluate: dict | None, benchmark: dict | None, environment: dict) -> dict:
    evals = dict((evaluate or {}).get("data", {}).get(role) or {})
    kl, chat = evals.pop("kl", None), evals.pop("chat", None)
    bench = dict((benchmark or {}).get("data", {}).get(role) or {})
    size = info.get("size_bytes")
    entry = {
        "path": str(info["path"]) if info.get("path") is not None else None,
        "description": info.get("description"),
        "size_bytes": size if M.is_number(size) else bench.get("size_bytes"),
        "meta": info.get("meta") or {},
        "eval": evals,
        "chat": {k: chat.get(k) for k in _CHAT_MODEL_KEYS} if isinstance(chat, dict) else None,
        "bench": bench,
        "measured_with": {"eval": _measured_with(evaluate, environment),
                          "bench": _measured_with(benchmark, environment)},
    }
    if role == "compressed":
        entry["kl"] = kl or {}
    return entry


def _comparison(models: dict, evaluate: dict | None, benchmark: dict | None) -> dict:
    orig, comp = models["original"], models["compressed"]
    out: dict[str, Any] = {"size": _size_entry(orig["size_bytes"], comp["size_bytes"])}
    out["eval"] = None
    if evaluate is not None:
        out["eval"] = {"measured_with": orig["measured_with"]["eval"],
                       "metrics": _eval_entries(orig["eval"], comp["eval"])}
    out["kl"] = None
    if comp.get("kl"):
        out["kl"] = {
            "measured_with": comp["measured_with"]["eval"],
            "metrics": {
                k: {"value": v, "better": M.direction(k)} for k, v in comp["kl"].items() if M.is_score(k, v)
            },
        }
    out["chat"] = _chat_entry(orig, comp, evaluate)
    out["bench"] = None
    if benchmark is not None:
        figures = {}
        ratios = (benchmark.get("data") or {}).get("ratios") or {}
        for fig in orig["bench"]:
            entry = M.compare_bench(fig, orig["bench"].get(fig), comp["bench"].get(fig), ratios.get(fig))
            if entry is not None:
                figures[fig] = entry
        out["bench"] = {"measured_with": orig["measured_with"]["bench"], "figures": figures}
    out["headline"] = _headline_figures(out)
    return out


def _chat_entry(orig: dict, comp: dict, evaluate: dict | None) -> dict | None:
    """The compressed model's chat replies against the original's (None unless both answered and they differ)."""
    chat = ((evaluate or {}).get("data", {}).get("compressed") or {}).get("chat")
    if not orig.get("chat") or not isinstance(chat, dict) or "flips" not in chat:
        return None
    accuracy = M.compare("accuracy", orig["chat"].get("accuracy"), (comp.get("chat") or {}).get("accuracy"))
    return {"measured_with": comp["measured_with"]["eval"], "accuracy": accuracy,
            **{k: chat.get(k) for k in _CHAT_COMPARE_KEYS}}


def _size_entry(original: Any, compressed: Any) -> dict:
    entry: dict[str, Any] = {"original_bytes": original, "compressed_bytes": compressed, "better": "lower"}
    if M.is_number(original) and M.is_number(compressed) and original and compressed:
        entry["ratio"] = compressed / original
        entry["shrink"] = original / compressed
        entry["change"] = M.size_words(entry["shrink"])
    return entry


def _eval_entries(orig: dict, comp: dict) -> dict:
    """Entries for every numeric score measured on both models (tasks seen on one side only stay in ``models``)."""
    out: dict[str, dict] = {}
    for task, o_metrics in orig.items():
        c_metrics = comp.get(task)
        if not isinstance(o_metrics, dict) or not isinstance(c_metrics, dict):
            continue
        for metric, o_val in o_metrics.items():
            if not M.is_score(metric, o_val):
                continue
            se = (o_metrics.get(_stderr_key(metric)), c_metrics.get(_stderr_key(metric)))
            entry = M.compare(metric, o_val, c_metrics.get(metric), stderr=se)
            if entry is not None:
                out.setdefault(task, {})[metric] = entry
    return out


def _stderr_key(metric: str) -> str:
    """``acc`` -> ``acc_stderr``; lm-eval's ``acc,none`` -> ``acc_stderr,none``."""
    name, sep, flt = metric.partition(",")
    return f"{name}_stderr{sep}{flt}"


def _headline_figures(comparison: dict) -> dict:
    """The few figures a headline, a leaderboard or a Pareto plot needs."""
    out: dict[str, Any] = {"size_shrink": comparison["size"].get("shrink"), "quality": None, "accuracy": None,
                           "speed": None}
    metrics = (comparison.get("eval") or {}).get("metrics") or {}
    for want_task, want_metric in _PPL_PREFERENCE:
        hit = next(((t, m) for t, ms in metrics.items() for m in ms
                    if M.base_name(m) == want_metric and (want_task is None or t == want_task)), None)
        if hit:
            out["quality"] = {"task": hit[0], "metric": hit[1], **metrics[hit[0]][hit[1]]}
            break
    for want in _ACC_PREFERENCE:
        hit = next(((t, m) for t, ms in metrics.items() for m in ms if M.base_name(m) == want), None)
        if hit:
            out["accuracy"] = {"task": hit[0], "metric": hit[1], **metrics[hit[0]][hit[1]]}
            break
    vision = ((comparison.get("eval") or {}).get("measured_with") or {}).get("model_kind") == "vision"
    for want in _VISION_QUALITY if vision and out["quality"] is None else []:
        hit = next(((t, m) for t, ms in metrics.items() for m in ms if M.base_name(m) == want), None)
        if hit:
            out["quality"] = {"task": hit[0], "metric": hit[1], **metrics[hit[0]][hit[1]]}
            break
    figures = (comparison.get("bench") or {}).get("figures") or {}
    for speed_figure in ("decode_tok_s", "images_per_s"):
        decode = sorted((M.split_batch(f)[1] or 0, f) for f in figures if M.split_batch(f)[0] == speed_figure)
        if decode:
            batch, fig = decode[0]
            out["speed"] = {"figure": fig, "batch": batch or None, **figures[fig]}
            break
    return out


def _method(stages: list[dict], compressed: dict, same: bool) -> str | None:
    """What changed the model: quantize methods and other model-producing stages, joined by " + "."""
    if same:
        return None
    names = []
    for s in stages:
        if s["type"] == "quantize":
            names.append(s["data"].get("method") or s["config"].get("method") or s["label"])
        elif s["model_dir"]:
            names.append(s["label"])
    return " + ".join(names) or (compressed.get("meta") or {}).get("method") or compressed.get("description")


def headline_text(report: dict) -> str:
    """One line: "bnb-nf4: 3.1x smaller, perplexity +6.2%, decode 1.32x faster at batch 1 — CPU, hf backend, ..."."""
    cmp = report["comparison"]
    head = cmp["headline"]
    cond = _headline_conditions(report)
    if report["same_model"]:
        return f"{report['name']}: no stage changed the model (compressed = original)" + (f" — {cond}" if cond else "")
    parts = []
    if cmp["size"].get("change"):
        parts.append(cmp["size"]["change"])
    for key in ("quality", "accuracy"):
        q = head.get(key)
        if q and not (key == "accuracy" and q == head.get("quality")):  # vision: one figure is both
            name = q["metric"] if q["task"] == q["metric"] else f"{q['task']} {q['metric']}"
            parts.append(f"{name} {q['change']}")
    if head.get("speed"):
        s = head["speed"]
        at = f" at batch {s['batch']}" if s.get("batch") else ""
        what = "images/s" if s["figure"].startswith("images_per_s") else "decode"
        parts.append(f"{what} {s['change']}{at}")
    text = f"{report['method'] or report['name']}: " + (", ".join(parts) if parts else "nothing measured")
    return text + (f" — {cond}" if cond else "")


def _headline_conditions(report: dict) -> str:
    cmp = report["comparison"]
    cond = (cmp.get("bench") or {}).get("measured_with") or (cmp.get("eval") or {}).get("measured_with")
    return M.conditions_text(cond or report["environment"])


def _notes(report: dict, stages: list[dict]) -> list[str]:
    """Caveats a reader must see: where the original came from, what was not measured, what was reused."""
    notes = []
    orig, comp = report["models"]["original"], report["models"]["compressed"]
    if orig["meta"].get("note"):
        notes.append(f"Original model: {orig['meta']['note']}.")
    if not report["same_model"] and comp["meta"].get("note") and comp["meta"].get("note") != orig["meta"].get("note"):
        notes.append(f"Compressed model: {comp['meta']['note']}.")
    if report["same_model"]:
        notes.append("No stage changed the model: the compressed model is the original, so any difference below "
                     "is measurement noise.")
    for kind, what in (("evaluate", "quality"), ("benchmark", "speed and memory")):
        runs = [s for s in stages if s["type"] == kind]
        if not runs:
            notes.append(f"No {kind} stage: {what} not measured.")
        elif len(runs) > 1:
            last = runs[-1]["dir"] or runs[-1]["label"]
            notes.append(f"{len(runs)} {kind} stages ran; the tables show the last ({last}).")
    resumed = [s["dir"] or s["label"] for s in stages if s["resumed"]]
    if resumed:
        notes.append(f"Reused from an earlier run (resumed): {', '.join(resumed)}.")
    one_sided = sorted(set(orig["eval"]) ^ set(comp["eval"]))
    if one_sided:
        notes.append(f"Measured on one model only (not compared): {', '.join(one_sided)}.")
    metrics = ((report["comparison"].get("eval") or {}).get("metrics") or {}).values()
    if any("within_noise" in e for ms in metrics for e in ms.values()):
        notes.append("Accuracy changes marked \"within noise\" are smaller than 1.96 combined standard errors.")
    return notes


def sanitize(obj: Any) -> Any:
    """Plain JSON: NaN/inf -> None, tuples -> lists, numpy scalars -> numbers, paths and other objects -> str."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [sanitize(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return sanitize(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)
