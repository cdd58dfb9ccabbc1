"""Report parts for the lora stage: how much of the quantization gap the adapter closes, and the merge modes.

Gap closure needs the quantized model measured before the adapter: it is computed when an evaluate stage comes
before the last lora stage and another after it (the recovery recipes do that). For a figure measured on the
original (o), the model before the lora stage (b) and after it (a)::

    gap_closed = (b - a) / (b - o)      # 1 = back to the original, 0 = no change, < 0 = worse than before

KL's original value is 0 by definition, top-1 agreement's is 1. "After" is the model the lora stage passes on (its
first merge mode: the adapter beside the base for ``keep``, a merged model otherwise); the merge table gives the
share for each mode built beside it too, when it was measured on the before stage's windows. Size and speed show what
the adapter costs.
"""

from __future__ import annotations

from typing import Any

from . import metrics as M

_FIGURES = (  # (name, where in an evaluate stage's per-model results, value on the original or None)
    ("kl_mean", ("kl", "kl_mean"), 0.0),
    ("top1_agreement", ("kl", "top1_agreement"), 1.0),
    ("perplexity", ("perplexity", "perplexity"), None),
)


def recovery(stages: list[dict]) -> dict | None:
    """``{"lora_stage", "before_stage", "after_stage", "figures": {name: {original, before, after, gap_closed}},
    "size": {...}, "bench": {...}}`` or None when no evaluate stage brackets the last lora stage."""
    loras = [s for s in stages if s["type"] == "lora"]
    if not loras:
        return None
    lora = loras[-1]
    before = [s for s in stages if s["type"] == "evaluate" and s["index"] < lora["index"]]
    after = [s for s in stages if s["type"] == "evaluate" and s["index"] > lora["index"]]
    if not before or not after:
        return None
    b, a = before[-1]["data"], after[0]["data"]
    # Only a distill adapter aims at the original; an sft adapter moves away from it on purpose (a task, not repair).
    # On a vision model sft trains on the task's own labels: it recovers the compressed model's accuracy.
    vision = (b.get("settings") or {}).get("model_kind") == "vision"
    recovering = lora["data"].get("objective") == "distill" or vision
    figures = {}
    for name, (part, key), fixed in _FIGURES + (_vision_figures(b) if vision else ()):
        o = fixed if fixed is not None else _get(b, "original", part, key)
        vb, va = _get(b, "compressed", part, key), _get(a, "compressed", part, key)
        if not all(M.is_number(x) for x in (o, vb, va)):
            continue
        gap = vb - o
        figures[name] = {"original": o, "before": vb, "after": va, "better": M.direction(name),
                         "gap_closed": (vb - va) / gap if gap and recovering else None,
                         "relative": (va - vb) / vb if vb else None}
    out: dict[str, Any] = {"lora_stage": _where(lora), "before_stage": _where(before[-1]),
                           "after_stage": _where(after[0]), "figures": figures}
    if vision:
        out["vision"] = True
    data = lora["data"]
    merge = (data.get("merges") or {}).get(data.get("merge")) or {}
    out["size"] = {"before_bytes": data.get("base_size_bytes"), "after_bytes": merge.get("size_bytes"),
                   "adapter_bytes": data.get("adapter_bytes")}
    out["train"] = {k: data.get(k) for k in ("objective", "init", "steps", "train_seconds", "trainable_params",
                                              "loss_first", "loss_last", "merge")}
    out["train"]["qat"] = bool(data.get("qat"))
    out["train"]["refit"] = bool((data.get("qat") or {}).get("refit"))
    out["bench"] = _bench(stages, lora["index"])
    return out


def _vision_figures(data: dict) -> tuple:
    """Vision evaluations: the headline score (top-1 ``acc``, detection ``map``) of the data evaluated on."""
    for task, metrics in (data.get("original") or {}).items():
        for name in ("map", "acc"):
            if isinstance(metrics, dict) and name in metrics:
                return ((name, (task, name), None),)
    return ()


def _bench(stages: list[dict], lora_index: int) -> dict | None:
    """Benchmark figures of the compressed model before and after the lora stage, when both were measured."""
    before = [s for s in stages if s["type"] == "benchmark" and s["index"] < lora_index]
    after = [s for s in stages if s["type"] == "benchmark" and s["index"] > lora_index]
    if not before or not after:
        return None
    b, a = before[-1]["data"].get("compressed") or {}, after[0]["data"].get("compressed") or {}
    return {f: {"before": b[f], "after": a[f]} for f in b if M.is_number(b.get(f)) and M.is_number(a.get(f))}


def merge_modes(stages: list[dict]) -> dict | None:
    """The merge modes a lora stage built and measured side by side (``merge: [keep, requantize, dequantized]``),
    each with the share of the quantization gap it closes when the evaluate stage before measured the same windows."""
    for s in reversed(stages):
        merges = s["data"].get("merges") if s["type"] == "lora" else None
        if merges and any("kl_mean" in m for m in merges.values()):
            measured = s["data"].get("merges_measured_with")
            modes = {mode: {**m, **_gaps(stages, s, measured, m)} for mode, m in merges.items()}
            qat = s["data"].get("qat") or {}
            refit = (qat.get("refit") or {}).get("measured")
            return {"stage": _where(s), "passed_on": s["data"].get("merge"), "modes": modes,
                    "measured_with": measured, "qat": bool(qat),
                    **({"refit": {**refit, **_gaps(stages, s, measured, refit)}} if refit else {})}
    return None


def _gaps(stages: list[dict], lora: dict, measured: dict | None, mode: dict) -> dict:
    """``{"kl_gap_closed", "perplexity_gap_closed"}`` of one merge mode against the evaluate stage before the lora
    stage, or {} when that stage is missing, scored other windows, or the adapter is not a recovery one."""
    if lora["data"].get("objective") != "distill":
        return {}
    before = [x for x in stages if x["type"] == "evaluate" and x["index"] < lora["index"]]
    if not before or not measured:
        return {}
    b = before[-1]["data"]
    settings = b.get("settings") or {}
    if settings.get("perplexity") != measured.get("perplexity") or settings.get("dtype") != measured.get("dtype"):
        return {}
    out = {}
    for name, part, key, fixed in (("kl", "kl", "kl_mean", 0.0), ("perplexity", "perplexity", "perplexity", None)):
        o = fixed if fixed is not None else _get(b, "original", part, key)
        vb, vm = _get(b, "compressed", part, key), mode.get(key)
        if all(M.is_number(x) for x in (o, vb, vm)) and vb != o:
            out[f"{name}_gap_closed"] = (vb - vm) / (vb - o)
    return out


def loss_curves(stages: list[dict]) -> list[dict] | None:
    """Every lora stage's training curve, as its run logged it: ``[{"stage", "objective", "steps", "loss", "lr",
    "resumed_from_step"}]`` (``steps`` 1-based), or None when no lora stage kept one. Drawn as plots/lora-loss.png."""
    out = []
    for s in stages:
        loss = s["data"].get("loss_curve") if s["type"] == "lora" else None
        if not loss:
            continue
        out.append({"stage": _where(s), "objective": s["data"].get("objective"),
                    "steps": list(range(1, len(loss) + 1)), "loss": list(loss), "lr": s["data"].get("lr_curve"),
                    "resumed_from_step": s["data"].get("resumed_from_step")})
    return out or None


def _get(data: dict, role: str, part: str, key: str) -> Any:
    return ((data.get(role) or {}).get(part) or {}).get(key)


def _where(stage: dict) -> str:
    return stage.get("dir") or stage.get("label") or str(stage.get("index"))


# ---------------------------------------------------------------------------------------------------------------------
# Markdown


def recovery_markdown(report: dict) -> str:
    rec = report["comparison"].get("recovery")
    if not rec:
        return ""
    rows = []
    recovering = rec["train"].get("objective") == "distill" or rec.get("vision", False)
    for name, f in rec["figures"].items():
        if recovering:
            change = f"{f['gap_closed'] * 100:.0f}%" if M.is_number(f["gap_closed"]) else "—"
        else:
            change = f"{f['relative'] * 100:+.1f}%" if M.is_number(f.get("relative")) else "—"
        rows.append([name, M.fmt_number(f["original"]), M.fmt_number(f["before"]), M.fmt_number(f["after"]), change])
    size = rec["size"]
    orig_size = report["models"]["original"].get("size_bytes")
    if M.is_number(size.get("before_bytes")) and M.is_number(size.get("after_bytes")):
        added = M.fmt_bytes(size["after_bytes"] - size["before_bytes"])
        rows.append(["size on disk", M.fmt_bytes(orig_size), M.fmt_bytes(size["before_bytes"]),
                     M.fmt_bytes(size["after_bytes"]), f"cost: +{added}"])
    for fig, v in (rec.get("bench") or {}).items():
        if M.bench_group(fig) != "speed":
            continue
        entry = M.compare_bench(fig, v["before"], v["after"])  # "before" in the original's place: the change
        rows.append([M.bench_label(fig), "", M.fmt_value(fig, v["before"]), M.fmt_value(fig, v["after"]),
                     f"cost: {entry['change']}" if entry else "—"])
    t = rec["train"]
    merge = t.get("merge") or "keep"
    after = "after lora (+ adapter)" if merge == "keep" else f"after lora (merged: {merge})"
    header = ["figure", "original", "before lora", after, "gap closed" if recovering else "change"]
    qat = (" (quantization-aware, on a base with re-fitted rounding)" if t.get("refit")
           else " (quantization-aware)" if t.get("qat") else "")
    train = (f"{t.get('objective')} LoRA{qat}, init {t.get('init')}, "
             f"{t.get('steps')} steps in {M.fmt_number(t.get('train_seconds'))} s, "
             f"{M.fmt_number(t.get('trainable_params'))} trainable params, loss {M.fmt_number(t.get('loss_first'))} "
             f"-> {M.fmt_number(t.get('loss_last'))}; passed on: merge `{merge}`")
    what = ("Gap closed = (before − after) / (before − original): the share of the gap to the original the adapter "
            "closes (KL's original value is 0, top-1 agreement's 1)."
            + (" On images, sft trains on the task's labels: a recovery objective." if rec.get("vision") else "")
            if recovering else
            "Change = (after − before) / before. An sft adapter learns a task: moving away from the original (KL up) "
            "is expected; judge it on the task's own data.")
    return (f"## LoRA {'recovery' if recovering else 'fine-tune'}\n\n" + _table(header, rows)
            + f"\n\n*{what} Before: {rec['before_stage']}, after: {rec['after_stage']}, same settings. "
              f"Adapter: {train}.*")


def merges_markdown(report: dict) -> str:
    mm = report["comparison"].get("merges")
    if not mm:
        return ""
    rows = []
    score = next((k for k in ("perplexity", "map", "acc") if any(k in m for m in mm["modes"].values())), "perplexity")
    gaps = any("kl_gap_closed" in m for m in mm["modes"].values())
    for mode, m in mm["modes"].items():
        name = mode + (" (passed on)" if mode == mm["passed_on"] else "")
        row = [name, M.fmt_number(m.get(score)), M.fmt_number(m.get("kl_mean"))]
        if gaps:
            row.append(f"{m['kl_gap_closed'] * 100:.0f}%" if M.is_number(m.get("kl_gap_closed")) else "—")
        rows.append(row + [M.fmt_number(m.get("top1_agreement")), M.fmt_bytes(m.get("size_bytes")),
                           f"{m['seconds']:.1f} s" if M.is_number(m.get("seconds")) else "—"])
    refit = mm.get("refit")
    if refit:  # the re-fitted base alone: the part of the recovery that is the rounding's, not the adapter's
        row = ["re-fitted base alone (no adapter)", M.fmt_number(refit.get(score)), M.fmt_number(refit.get("kl_mean"))]
        if gaps:
            row.append(f"{refit['kl_gap_closed'] * 100:.0f}%" if M.is_number(refit.get("kl_gap_closed")) else "—")
        rows.append(row + [M.fmt_number(refit.get("top1_agreement")), "", ""])
    cond = M.describe_conditions(mm.get("measured_with"))
    requantize = next((m.get("requantize_from") for m in mm["modes"].values() if m.get("requantize_from")), None)
    header = ["merge", {"acc": "top-1 accuracy", "map": "mAP"}.get(score, score), "KL mean vs original"]
    return ("## LoRA merge modes\n\n"
            + _table(header + (["KL gap closed"] if gaps else []) + ["top-1 agreement", "size on disk", "merge time"],
                     rows)
            + f"\n\n*keep: adapter beside the quantized base (loads with peft); requantize: merged into "
              f"{_REQUANTIZE_FROM.get(requantize, 'the weights before quantization')}, quantized again with the same "
              f"method; dequantized: merged into a dense copy of the dequantized base."
              + (" The adapter was trained quantization-aware: on the requantized model's forward." if mm.get("qat")
                 else "")
              + (" Its base's rounding was re-fitted first (GPTQ into the same grid): the re-fitted base alone is the "
                 "last row." if mm.get("refit") else "")
              + (" KL gap closed: against the evaluate stage before the lora stage." if gaps else "")
              + f" Same adapter, measured with: {cond}.*")


_REQUANTIZE_FROM = {"original": "the weights before quantization", "dequantized": "the dequantized base"}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
