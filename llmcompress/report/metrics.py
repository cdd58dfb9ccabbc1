"""What a figure means: which direction is better, how to name and format it, and how to word a change honestly.

Names come from the evaluate stage (``perplexity``, ``acc``, ``kl_mean``; lm-eval's ``acc,none`` too) and the
benchmark stage (``decode_tok_s_bs8``, ``ttft_ms``, ``peak_rss_bytes``). Unknown names still get a delta, with
``better: None``, so a new metric is reported before anyone teaches this module about it.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: Relative changes smaller than this read as "about the same" for timings (a loaded box jitters by a few %).
SPEED_TOLERANCE = 0.05
#: ... and for sizes and memory, which are exact counts.
SIZE_TOLERANCE = 0.005

_LOWER = re.compile(r"(perplexity|bits_per_byte|^loss$|^nll$|^kl_|_ms$|_ms_|_s$|_seconds$|_bytes$|^ttft)")
_HIGHER = re.compile(
    r"(^acc|^exact_match$|^em$|^f1$|^mcc$|^bleu|^rouge|^top\d+_agreement$|tok_s|^requests_per_s|^recovery"
    r"|^images_per_s|^map(_\d+)?$|^mar_\d+$)"
)
#: Numbers that describe a measurement rather than score it (kept in the report, never compared).
_META = re.compile(r"(_stderr$|^tokens$|^samples$|^n$|^count$|^num_|^alias$|^corpus$)")

_BENCH_LABELS = {
    "size_bytes": "size on disk",
    "param_bytes": "weights in memory",
    "peak_rss_bytes": "peak RSS memory",
    "peak_rss_model_bytes": "peak RSS (model)",
    "rss_load_bytes": "RSS after load",
    "peak_gpu_bytes": "peak GPU memory",
    "load_s": "load time",
    "ttft_ms": "time to first token",
    "prefill_tok_s": "prefill tokens/s",
    "decode_tok_s": "decode tokens/s",
    "decode_ms_per_token": "decode ms/token",
    "output_tok_s": "output tokens/s (offline)",
    "requests_per_s": "requests/s",
    "ttft_p50_ms": "TTFT p50",
    "ttft_p95_ms": "TTFT p95",
    "itl_p50_ms": "inter-token latency p50",
    "itl_p95_ms": "inter-token latency p95",
    "model_memory_bytes": "weights in memory (vLLM)",
    "images_per_s": "images/s",
    "latency_ms": "latency per batch (median)",
    "latency_p95_ms": "latency per batch p95",
}
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def base_name(name: str) -> str:
    """``"acc,none"`` (lm-eval's metric,filter keys) -> ``"acc"``."""
    return name.split(",")[0]


def direction(name: str) -> str | None:
    """``"lower"`` or ``"higher"`` (is better), or None when unknown."""
    name = base_name(name)
    if _HIGHER.search(name):
        return "higher"
    if _LOWER.search(name):
        return "lower"
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_score(name: str, value: Any) -> bool:
    """True for figures worth comparing (numbers that are not a stderr, a token count or a corpus name)."""
    return is_number(value) and not _META.search(base_name(name))


def is_fraction_metric(name: str, *values: Any) -> bool:
    """Accuracy-like: higher is better and every value lies in [0, 1]; its changes read in points."""
    return direction(name) == "higher" and all(is_number(v) and 0.0 <= v <= 1.0 for v in values)


def split_batch(figure: str) -> tuple[str, int | None]:
    """``"decode_tok_s_bs8"`` -> ``("decode_tok_s", 8)``."""
    m = re.fullmatch(r"(.+)_bs(\d+)", figure)
    return (m.group(1), int(m.group(2))) if m else (figure, None)


def bench_label(figure: str) -> str:
    base, bs = split_batch(figure)
    label = _BENCH_LABELS.get(base, base.replace("_", " "))
    return f"{label} (batch {bs})" if bs is not None else label


def bench_group(figure: str) -> str:
    """Which report table a benchmark figure belongs to: size, memory or speed."""
    if figure == "size_bytes":
        return "size"
    return "memory" if figure.endswith("_bytes") else "speed"


def fmt_bytes(n: Any) -> str:
    if not is_number(n):
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_number(x: Any) -> str:
    """Four significant digits, no exponent for everyday magnitudes; '—' for missing values."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if not math.isfinite(x):
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_value(name: str, value: Any) -> str:
    """A figure with its unit: bytes as MiB, ms, s, tok/s; scores as plain numbers."""
    if not is_number(value):
        return fmt_number(value)
    base = split_batch(base_name(name))[0]
    if base.endswith("_bytes"):
        return fmt_bytes(value)
    if "tok_s" in base:
        return f"{value:,.1f} tok/s"
    if base == "requests_per_s":
        return f"{value:,.2f} req/s"
    if base == "images_per_s":
        return f"{value:,.1f} img/s"
    if base.endswith("_ms") or "_ms_" in base:
        return f"{value:,.1f} ms"
    if base.endswith("_s") or base.endswith("_seconds"):
        return f"{value:.2f} s"
    return fmt_number(value)


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if r < 2 else f"{r:.1f}x"


def compare(
    name: str, original: Any, compressed: Any, stderr: tuple[Any, Any] = (None, None), points: bool = True
) -> dict | None:
    """One comparison entry, or None when either side is not a number.

    ``delta`` = compressed - original; ``relative`` = delta / original; fraction metrics add ``recovery``
    (compressed / original, as in llm-compressor's gates) and, with stderrs, ``within_noise``.
    """
    if not (is_number(original) and is_number(compressed)):
        return None
    better = direction(name)
    delta = compressed - original
    entry: dict[str, Any] = {
        "original": original,
        "compressed": compressed,
        "better": better,
        "delta": delta,
        "relative": delta / original if original else None,
        "verdict": _verdict(better, delta, original),
    }
    if points and is_fraction_metric(name, original, compressed):
        entry["unit"] = "points"
        entry["recovery"] = compressed / original if original else None
        if all(is_number(s) for s in stderr):
            se = math.hypot(*stderr)  # unpaired (conservative: both models saw the same items)
            entry["stderr"] = se
            entry["within_noise"] = abs(delta) <= 1.96 * se
    entry["change"] = change_text(name, entry)
    return entry


def compare_bench(figure: str, original: Any, compressed: Any, ratio: float | None = None) -> dict | None:
    """A comparison entry for a benchmark figure, plus ``ratio`` (compressed / original) and, for timings,
    ``speedup`` (how many times faster the compressed model is; < 1 means slower).

    ``ratio``: the stage's own ratio when it has one (the median of per-round paired ratios, which cancels drift on
    a noisy machine better than a ratio of medians); otherwise the quotient of the two figures.
    """
    entry = compare(figure, original, compressed, points=False)
    if entry is None:
        return None
    entry["ratio"] = ratio if is_number(ratio) else (compressed / original if original else None)
    if bench_group(figure) == "speed" and original and compressed:
        r = entry["ratio"]
        entry["speedup"] = r if entry["better"] == "higher" else 1 / r
    entry["change"] = change_text(figure, entry)
    return entry


def _verdict(better: str | None, delta: float, original: float) -> str | None:
    if better is None:
        return None
    if delta == 0 or (original and abs(delta / original) < 1e-9):
        return "same"
    return "better" if (delta < 0) == (better == "lower") else "worse"


def change_text(name: str, entry: dict) -> str:
    """Honest words for a change: "+6.2%", "-3.0 pts", "1.32x faster", "2.4x smaller", never "faster" below 1x."""
    if "speedup" in entry:
        return speed_words(entry["speedup"])
    if name.endswith("_bytes") and entry.get("ratio"):
        return size_words(1 / entry["ratio"], memory=bench_group(name) == "memory")
    if entry.get("unit") == "points":
        text = f"{entry['delta'] * 100:+.1f} pts"
        return text + (" (within noise)" if entry.get("within_noise") else "")
    if entry.get("relative") is None:
        return f"{entry['delta']:+.4g}"
    return f"{entry['relative'] * 100:+.1f}%"


def speed_words(speedup: float) -> str:
    if abs(speedup - 1) < SPEED_TOLERANCE:
        return f"about the same ({fmt_ratio(speedup)})"
    return f"{fmt_ratio(speedup)} faster" if speedup > 1 else f"{fmt_ratio(1 / speedup)} slower"


def size_words(shrink: float, memory: bool = False) -> str:
    """``shrink`` = original / compressed; sizes get smaller/larger, memory less/more."""
    if abs(shrink - 1) < SIZE_TOLERANCE:
        return "same memory" if memory else "same size"
    less, more = ("less", "more") if memory else ("smaller", "larger")
    return f"{fmt_ratio(shrink)} {less}" if shrink > 1 else f"{fmt_ratio(1 / shrink)} {more}"


def short_dtype(dtype: Any) -> str:
    return _DTYPES.get(str(dtype), str(dtype))


def conditions_text(cond: dict) -> str:
    """``{"device": "cpu", "threads": 1, "dtype": "bfloat16", "backend": "hf", ...}``
    -> "CPU, hf backend, bf16, 1 thread"."""
    parts = []
    device = cond.get("device")
    if device:
        hw = cond.get("gpu") or cond.get("cpu")
        cores = f", {cond['cpu_count']} cores" if cond.get("cpu_count") and device == "cpu" else ""
        parts.append(str(device).upper() + (f" ({hw}{cores})" if hw else ""))
    if cond.get("backend"):
        parts.append(f"{cond['backend']} backend")
    if cond.get("dtype"):
        parts.append(short_dtype(cond["dtype"]))
    if cond.get("threads") is not None and device in (None, "cpu"):
        n = cond["threads"]
        parts.append(f"{n} thread" + ("" if n == 1 else "s"))
    return ", ".join(parts)


_SETTING_WORDS = {
    "prompt_tokens": "prompt {} tokens",
    "new_tokens": "{} new tokens",
    "batch_sizes": "batch sizes {}",
    "repeats": "{} repeats",
    "max_length": "max length {}",
    "batch_size": "batch size {}",
    "limit": "limit {} examples per task",
    "tasks": "tasks {}",
}
_NOT_SETTINGS = {"device", "gpu", "cpu", "cpu_count", "threads", "dtype", "backend", "stage"}


def describe_conditions(cond: dict | None) -> str:
    """The full "how it was measured" line: runtime first, then every other setting of the stage."""
    if not cond:
        return "not measured"
    parts = [conditions_text(cond)] if conditions_text(cond) else []
    for key, value in cond.items():
        if key in _NOT_SETTINGS or value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        parts.append(_SETTING_WORDS.get(key, key.replace("_", " ") + " {}").format(value))
    if cond.get("stage"):
        parts.append(f"stage {cond['stage']}")
    return "; ".join(parts)
