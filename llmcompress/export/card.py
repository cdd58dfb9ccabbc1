"""The model card (README.md) of an export: how the model was made, what the run measured, how to load it, caveats.

Built from the report dict (``report.build_report``): at export time from the stages finished so far, and again at
the end of the run from the final report, so a card written before the evaluate stage still shows its figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..report import metrics as M
from ..report.markdown import _stages, _table

#: Builtin model names -> the hub id of the model they hold and its license (the card's ``base_model``, ``license``).
_BASE_MODELS = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
#: Eval figures that are not scores (left out of the card's ``model-index``).
_NOT_SCORES = ("samples", "tokens", "corpus")


def write_card(folder: Path, report: dict, export: dict) -> Path:
    """Write ``README.md`` into ``folder`` (atomically) from ``report`` and the export stage's data."""
    from ..utils.io import atomic_write_text

    path = Path(folder) / "README.md"
    atomic_write_text(path, render_card(report, export))
    return path


def refresh_cards(report: dict) -> list[str]:
    """Rewrite the card of every export stage in ``report`` whose folder still exists; return their paths."""
    done = []
    for stage in report.get("stages", []):
        data = stage.get("data") or {}
        if stage.get("type") == "export" and data.get("card") and Path(data.get("path", "")).is_dir():
            done.append(str(write_card(Path(data["path"]), report, data)))
    return done


def render_card(report: dict, export: dict, repo_id: str | None = None) -> str:
    """The card's text: hub metadata (``ModelCardData``, so the hub renders ``model-index``) then the sections.

    ``repo_id``: the hub repo it is pushed to (names the model in ``model-index``), else the recipe's name.
    """
    quant = _quantize_stage(report)
    data = card_data(report, export, quant, repo_id)
    sections = [
        "---\n" + data.to_yaml() + "\n---",
        _title(report, export, quant),
        _made(report, export, quant),
        _measured(report, export),
        _load(export),
        _caveats(report, export),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _quantize_stage(report: dict) -> dict | None:
    found = [s for s in report.get("stages", []) if s["type"] == "quantize"]
    return found[-1] if found else None


def card_data(report: dict, export: dict, quant: dict | None = None, repo_id: str | None = None):
    """The card's metadata as huggingface_hub's ``ModelCardData`` (what the hub reads: base model and relation,
    license, library, tags, ``model-index`` eval results) plus our ``quantization`` block."""
    from huggingface_hub import ModelCardData

    meta = _front_matter(report, export, quant)
    results = eval_results(report)
    return ModelCardData(**meta, eval_results=results or None,
                         model_name=(repo_id or report.get("name") or "model") if results else None)


def _base_model(report: dict) -> tuple[str | None, str | None]:
    """The original's hub id (None for a local folder) and its license (from its own card when it has one)."""
    source = (report.get("recipe", {}).get("model") or {}).get("source", "")
    if source in _BASE_MODELS:
        return _BASE_MODELS[source]
    base = source if "/" in source and not Path(source).expanduser().exists() else None
    return base, _license_of(Path((report.get("models", {}).get("original") or {}).get("path") or "-"))


def _license_of(folder: Path) -> str | None:
    """``license:`` of a model folder's README.md (a hub snapshot keeps the original's card), else None."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        found = ModelCard.load(card, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 - a card we cannot parse just tells us no license
        return None
    return found if isinstance(found, str) and found else None


def base_model_relation(report: dict) -> str | None:
    """What the run did to the original, as the hub's ``base_model_relation``: ``adapter`` (a LoRA kept unmerged),
    ``finetune`` (a LoRA merged into the weights), ``quantized``; None when only pruning (or nothing) changed it.
    (The hub's ``merge`` means several models merged into one, which no stage does.)"""
    stages = report.get("stages", [])
    loras = [s for s in stages if s.get("type") == "lora"]
    if loras:
        return "adapter" if (loras[-1].get("data") or {}).get("merge") == "keep" else "finetune"
    return "quantized" if any(s.get("type") == "quantize" for s in stages) else None


def eval_results(report: dict) -> list:
    """The compressed model's evaluate figures as huggingface_hub ``EvalResult``s (the card's ``model-index``)."""
    import math

    from huggingface_hub import EvalResult

    model = (report.get("models") or {}).get("compressed") or {}
    conditions = (model.get("measured_with") or {}).get("eval") or {}
    task_type = "image-classification" if conditions.get("model_kind") == "vision" else "text-generation"
    out = []
    for task, metrics in (model.get("eval") or {}).items():
        dataset = (metrics or {}).get("corpus") if task == "perplexity" else task
        for metric, value in (metrics or {}).items():
            if (metric in _NOT_SCORES or metric.endswith("_stderr") or isinstance(value, bool)
                    or not isinstance(value, (int, float)) or not math.isfinite(value)):
                continue
            out.append(EvalResult(task_type=task_type, dataset_type=str(dataset or task), dataset_name=task,
                                  metric_type=metric, metric_value=round(float(value), 6)))
    return out


def _front_matter(report: dict, export: dict, quant: dict | None) -> dict[str, Any]:
    base, license_ = _base_model(report)
    method = report.get("method")
    tags = ["llmcompress", export["format"]]
    out: dict[str, Any] = {}
    if base:
        out["base_model"] = base
        relation = base_model_relation(report)
        if relation:  # the hub reads it only beside base_model
            out["base_model_relation"] = relation
    if license_:
        out["license"] = license_
    out["library_name"] = export.get("library", "transformers")
    if quant:
        cfg = quant["config"]
        tags += ["quantized", cfg.get("method", "")]
        bits = quant["data"].get("bits") or cfg.get("bits")
        bits = int(bits) if isinstance(bits, float) and bits.is_integer() else bits
        if bits:
            tags.append(f"{bits:g}-bit")
        out["quantization"] = {k: v for k, v in {
            "method": cfg.get("method"), "bits": bits, "group_size": cfg.get("group_size"),
            "symmetric": cfg.get("sym", cfg.get("symmetric")), "format": _format_words(export),
        }.items() if v is not None}
    elif method:
        tags.append(method)
    if any(s.get("type") == "lora" for s in report.get("stages", [])):
        tags.append("lora")
    out["tags"] = [t for t in dict.fromkeys(tags) if t]
    return out


def _format_words(export: dict) -> str:
    if export["format"] == "compressed-tensors":
        scheme = export.get("scheme") or {}
        return f"compressed-tensors ({scheme.get('format') or export.get('saved_format') or 'as saved'})"
    if export["format"] == "gguf":
        return f"gguf ({export.get('gguf_type')})"
    return "dense (dequantized)" if export.get("dequantized") else "hf (as saved by the quantizer)"


def _title(report: dict, export: dict, quant: dict | None) -> str:
    what = report.get("method") or "the original model (no stage changed it)"
    lines = [f"# {report['name']}: {what}, exported as {_format_words(export)}", ""]
    if report.get("comparison", {}).get("eval") or report.get("comparison", {}).get("bench"):
        lines.append(f"**{report['headline']}**")
    else:
        lines.append("*Not evaluated yet when this card was written (no evaluate or benchmark stage had run).*")
    lines += ["", f"Made with llmcompress from the recipe `{report['name']}`; loads with {export['consumer']}."]
    return "\n".join(lines)


def _made(report: dict, export: dict, quant: dict | None) -> str:
    orig = report["models"]["original"]
    lines = ["## How it was made", "", f"- Original: {orig.get('description') or orig.get('path')}"
             + (f" ({orig['meta']['note']})" if orig.get("meta", {}).get("note") else "")]
    if quant:
        calib = quant["data"].get("calibration")
        if calib:
            lines.append(f"- Calibration: {json.dumps(calib, separators=(', ', ': '))}")
    export_how = f"- Export: `{export['format']}`"
    if export.get("scheme"):
        s = export["scheme"]
        export_how += (f", converted to compressed-tensors `{s['format']}` int{s['num_bits']} "
                       f"{s['strategy']}{' ' + str(s['group_size']) if s.get('group_size') else ''}, "
                       f"{'symmetric' if s['symmetric'] else 'with zero points'}, {s['quantized_layers']} layers "
                       "(the quantizer's own scales and zero points; nothing re-rounded)")
    elif export.get("converted") is False or export["format"] == "hf":
        export_how += (", dequantized to dense weights" if export.get("dequantized")
                       else ", the quantizer's folder as saved")
    lines.append(export_how)
    versions = report.get("environment", {}).get("versions") or {}
    if versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines += ["", _stages(report).replace("## What was done", "### Stages")]
    lines += ["", "Recipe:", "", "```yaml", yaml.safe_dump(report.get("recipe", {}), sort_keys=False).strip(), "```"]
    return "\n".join(lines)


def _measured(report: dict, export: dict) -> str:
    cmp = report.get("comparison") or {}
    head = cmp.get("headline") or {}
    size = cmp.get("size") or {}
    rows = [["size on disk (weights)", M.fmt_bytes(size.get("original_bytes")),
             M.fmt_bytes(size.get("compressed_bytes")), size.get("change", "—")]]
    if export["format"] != "hf" or export.get("dequantized"):
        rows.append(["this export on disk (whole folder)", "", M.fmt_bytes(export.get("size_bytes")), ""])
    for key in ("quality", "accuracy"):
        e = head.get(key)
        if e:
            name = e["metric"] if e["task"] == e["metric"] else f"{e['task']} {e['metric']}"
            rows.append([name, M.fmt_number(e["original"]), M.fmt_number(e["compressed"]), e["change"]])
    for name, e in ((cmp.get("kl") or {}).get("metrics") or {}).items():
        rows.append([name, "—", M.fmt_number(e["value"]), "vs original"])
    if head.get("speed"):
        e = head["speed"]
        rows.append([M.bench_label(e["figure"]), M.fmt_value(e["figure"], e["original"]),
                     M.fmt_value(e["figure"], e["compressed"]), e["change"]])
    lines = ["## What was measured", "", _table(["figure", "original", "compressed", "change"], rows), ""]
    if cmp.get("eval"):
        lines.append(f"*Quality measured with: {M.describe_conditions(cmp['eval']['measured_with'])}.*")
    else:
        lines.append("*Quality: not measured (no evaluate stage before this card was written).*")
    if cmp.get("bench"):
        lines.append(f"*Speed measured with: {M.describe_conditions(cmp['bench']['measured_with'])}.*")
    reload = export.get("reload")
    if reload:
        lines += ["", f"Reload check: this folder, loaded in a fresh process by its consumer, gives logits within "
                      f"{M.fmt_number(reload['max_abs_logit_diff'])} (max |Δ|; logits up to "
                      f"{M.fmt_number(reload['max_abs_logit'])}) of the model evaluated above, top-1 token agreement "
                      f"{reload['top1_agreement']:.0%} over {reload['tokens']} {reload.get('unit', 'tokens')}."]
    lines += ["", "The full report (all tasks, memory, conditions) is `report.md` in the run folder."]
    return "\n".join(lines)


def _load(export: dict) -> str:
    return f"## How to load it\n\n```python\n{export['load_code']}\n```"


def _caveats(report: dict, export: dict) -> str:
    items = list(export.get("caveats") or []) + list(report.get("notes") or [])
    return "## Caveats\n\n" + "\n".join(f"- {c}" for c in items) if items else ""
