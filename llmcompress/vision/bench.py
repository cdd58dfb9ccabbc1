"""The benchmark stage on a vision model: images/s and latency at several batch sizes, memory, size on disk.

Fair ratios as for LLMs (``bench/stage.py``): every model is timed in this process, interleaved call by call
(original, compressed, original, ...) after warm-up; a call runs forward passes on real digit images (the
processor's pixel values, the same tensor for every model) until it has lasted ``CALL_SECONDS`` and at least
``MIN_FORWARDS`` passes. Per call: ``images_per_s_bs{B}`` (B x passes / wall time), ``latency_ms_bs{B}`` (median
pass) and ``latency_p95_ms_bs{B}``. Figures are medians over rounds; the ratio of a timed figure is the median of
its per-round ratios, a size or memory ratio a plain quotient. Memory and load time come from a fresh process per
model (``vision/memory.py``); the original's are cached across runs.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext
    from ..stage import StageResult

CALL_SECONDS = 0.3
MIN_FORWARDS = 3


def batch_inputs(model: Any, processor: Any, batch_sizes: list[int]) -> dict[int, Any]:
    """``{B: pixel_values (B, C, H, W)}`` from the digits test split (cycled when B exceeds it)."""
    from PIL import Image

    from .data import digits_arrays, model_input

    images, _ = digits_arrays("test")
    pil = [Image.fromarray(images[i % len(images)], "L") for i in range(max(batch_sizes))]
    x = model_input(pil, processor, model)
    return {b: x[:b].contiguous() for b in batch_sizes}


def forward(model: Any, x: Any) -> Any:
    import torch

    with torch.inference_mode():
        out = model(pixel_values=x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return out


def time_call(model: Any, x: Any) -> dict:
    """Forward passes on ``x`` for at least CALL_SECONDS and MIN_FORWARDS passes; the call's figures."""
    times = []
    start = time.perf_counter()
    while len(times) < MIN_FORWARDS or time.perf_counter() - start < CALL_SECONDS:
        t = time.perf_counter()
        forward(model, x)
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    b = x.shape[0]
    ordered = sorted(times)
    return {"batch_size": b, "forwards": len(times), "seconds": round(total, 5),
            f"images_per_s_bs{b}": b * len(times) / total,
            f"latency_ms_bs{b}": 1000 * statistics.median(times),
            f"latency_p95_ms_bs{b}": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def run_benchmark(stage: Any, ctx: "RunContext") -> "StageResult":
    import torch

    from ..stage import StageResult
    from .data import input_dtype

    t0 = time.perf_counter()
    torch.set_num_threads(ctx.runtime.threads)
    same = ctx.current is ctx.original
    handles = {"original": ctx.original} if same else {"original": ctx.original, "compressed": ctx.current}
    handles.update(stage._compare_handles(ctx, handles))
    _check_compare_kinds(handles, ctx.original.path)
    models = {role: h.load() for role, h in handles.items()}
    inputs = batch_inputs(*models["original"], stage.batch_sizes)  # one tensor for every model
    calls_total = len(handles) * (stage.warmup + stage.repeats * len(stage.batch_sizes))
    with ctx.task(f"{stage.label} (images)", total=calls_total + (len(handles) if stage.memory else 0)) as advance:
        memory = {role: _memory(stage, ctx, h, advance) for role, h in handles.items()} if stage.memory else {}
        calls = time_interleaved(stage, {r: m for r, (m, _) in models.items()}, inputs, advance)
    per_repeat = {role: _per_repeat(calls, role) for role in handles}
    figs = {role: _figures(h, models[role][0], memory.get(role), per_repeat[role]) for role, h in handles.items()}
    if same:
        figs["compressed"] = dict(figs["original"])
    ratios = {role: _ratios(figs, per_repeat, role) for role in figs if role != "original"}
    engine = {"engine": "transformers (one forward per batch)", "threads": torch.get_num_threads(),
              "dtype": str(input_dtype(models["original"][0])).split(".")[-1]}
    data = {
        "settings": _settings(stage, ctx, inputs),
        "same_model": same,
        "models": {role: h.describe() for role, h in handles.items()} | (
            {"compressed": ctx.current.describe()} if same else {}),
        "original": figs["original"], "compressed": figs["compressed"], "ratios": ratios.get("compressed", {}),
        "backends": {"hf": {"engine": engine, "figures": figs, "ratios": ratios, "unsupported": {}}},
        "cross": {},
        "raw": {"calls": calls, "per_repeat": per_repeat, "memory": memory},
        "applied_config": {"type": "benchmark", "batch_sizes": list(stage.batch_sizes), "repeats": stage.repeats,
                           "warmup": stage.warmup, "memory": stage.memory, "compare": list(stage.compare)},
    }
    return StageResult(type="benchmark", label=stage.label, seconds=time.perf_counter() - t0, data=data,
                       summary=summarize(figs["original"], figs["compressed"], data["ratios"], same))


def time_interleaved(stage: Any, models: dict[str, Any], inputs: dict[int, Any], advance) -> list[dict]:
    """Warm-up at the smallest batch, then every (round, batch size), alternating models call by call."""
    plan = [("warmup", r, [stage.batch_sizes[0]]) for r in range(stage.warmup)]
    plan += [("timed", r, stage.batch_sizes) for r in range(stage.repeats)]
    calls = []
    for phase, r, batch_sizes in plan:
        gc.collect()
        for bs in batch_sizes:
            for role, model in models.items():
                gc.disable()
                try:
                    timing = time_call(model, inputs[bs])
                finally:
                    gc.enable()
                calls.append({"phase": phase, "repeat": r, "role": role, **timing})
                advance(1, description=f"benchmark: {phase} {r + 1}, batch {bs}, {role}")
    return calls


def _per_repeat(calls: list[dict], role: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for c in calls:
        if c["phase"] == "timed" and c["role"] == role:
            for k, v in c.items():
                if k.startswith(("images_per_s_bs", "latency_")):
                    out.setdefault(k, []).append(round(v, 4))
    return out


def _figures(handle: "ModelHandle", model: Any, memory: dict | None, per_repeat: dict) -> dict:
    from ..models.loading import param_bytes

    out: dict[str, Any] = {"size_bytes": handle.size_bytes, "param_bytes": param_bytes(model)}
    if memory:
        out.update(load_s=memory["load_s"], peak_rss_bytes=memory["peak_rss_bytes"],
                   rss_load_bytes=memory["rss_load_bytes"],
                   peak_rss_model_bytes=memory["peak_rss_bytes"] - memory["rss_base_bytes"])
    out.update({k: round(statistics.median(v), 4) for k, v in per_repeat.items()})
    return out


def _ratios(figs: dict, per_repeat: dict, role: str) -> dict:
    from ..bench.stage import _paired, _ratio

    ratios = {k: _ratio(figs[role].get(k), v) for k, v in figs["original"].items() if k in figs[role]}
    paired = _paired(per_repeat.get("original", {}), per_repeat.get(role, {}))
    ratios.update({k: round(statistics.median(v), 4) for k, v in paired.items() if v and None not in v})
    return ratios


#: The probe run in a fresh process (``python -m``) to measure load time and memory; it imports this module.
MEMORY_PROBE = "llmcompress.vision.memory"


def _memory(stage: Any, ctx: "RunContext", handle: "ModelHandle", advance) -> dict:
    from ..bench.memory import measure_memory

    fresh = []
    batch = stage.batch_sizes[0]

    def probe() -> dict:
        ctx.log(f"benchmark: load time and memory of the {handle.role} model, in a fresh process")
        fresh.append(True)
        return measure_memory(handle.path, ctx.runtime.device, ctx.runtime.dtype, ctx.runtime.threads,
                              module=MEMORY_PROBE, args=["--batch-size", str(batch)])

    if handle is ctx.original:
        result = ctx.baseline("vision-bench-memory", {"batch_size": batch}, probe)
    else:
        result = probe()
    advance(1, description=f"benchmark: memory of the {handle.role} model")
    return {**result, "cached": not fresh}


def _check_compare_kinds(handles: dict, original: Any) -> None:
    """Every model takes the original's pixels: a compare entry of another kind or task is refused before loading."""
    from ..errors import RecipeError
    from ..models.family import folder_kind

    want = folder_kind(original)
    for role, h in handles.items():
        got = folder_kind(h.path)
        if got != want:
            raise RecipeError(f"benchmark `compare` entry `{role}` ({h.path}) is a {got[0]} model"
                              f"{f' ({got[1]})' if got[1] else ''}, and this run's model is a {want[0]} model "
                              f"({want[1]}): they cannot be timed on the same images. Fix: compare runs of the same "
                              "vision model.")


def _settings(stage: Any, ctx: "RunContext", inputs: dict) -> dict:
    x = next(iter(inputs.values()))
    return {"model_kind": "vision", "backends": ["hf"], "batch_sizes": list(stage.batch_sizes),
            "repeats": stage.repeats, "warmup": stage.warmup, "image_shape": list(x.shape[1:]),
            "input": "digits test images through the original's image processor (the same tensor for every model)",
            "call": f"forward passes for >= {CALL_SECONDS} s and >= {MIN_FORWARDS} passes per call",
            **ctx.runtime.describe(),
            "memory": "fresh process per model, peak = VmHWM" if stage.memory else "off"}


_UNITS = [("size_bytes", "size", "MiB", 2**-20, 2), ("peak_rss_bytes", "peak RSS", "MiB", 2**-20, 0),
          ("load_s", "load", "s", 1, 2), ("images_per_s_bs", "images/s bs", "img/s", 1, 1),
          ("latency_ms_bs", "latency bs", "ms", 1, 2)]


def summarize(orig: dict, comp: dict, ratios: dict, same: bool) -> dict[str, str]:
    """Lines like ``"images/s bs8": "812.0 -> 1020.3 img/s (1.26x)"`` (the LLM benchmark's, with image units)."""
    from ..bench.stage import summarize as summary_lines

    return summary_lines(orig, comp, ratios, same, units=_UNITS)
