"""What a run will cost before it starts: peak memory and time of each stage, from lines fitted by
benchmarks/scaling.py.

``llmcompress validate`` prints the estimate, and every run refuses (before weights load) a recipe whose estimated
peak exceeds this machine's memory, with the figure and the fix. The lines were measured on random-weight llamas
(135M to 1.7B, and Llama-3-8B's layer shape) on a 2-core CPU in bfloat16: peak = a + b x parameters (the run
process's resident high-water mark), seconds = c + d x parameters. A float32 run holds twice the weights, so its
per-parameter term is doubled. Stage settings far from the measured ones (longer perplexity windows, large batches)
cost more than the line says; stages never measured get no figure.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe

FIT = Path(__file__).resolve().parent / "data" / "scaling.json"


@dataclass(frozen=True)
class StageCost:
    stage: str  # the fitted line's name: quantize:<method>, evaluate, lora, ...
    peak_bytes: int | None
    seconds: float | None


@dataclass(frozen=True)
class Estimate:
    params: int
    stages: list[StageCost]
    machine_bytes: int | None

    @property
    def peak_bytes(self) -> int | None:
        peaks = [s.peak_bytes for s in self.stages if s.peak_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def seconds(self) -> float | None:
        secs = [s.seconds for s in self.stages if s.seconds is not None]
        return sum(secs) if secs else None

    def fits(self) -> bool:
        return self.peak_bytes is None or self.machine_bytes is None or self.peak_bytes <= self.machine_bytes


def safetensors_params(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files, from their headers (no weights read)."""
    from .utils.tensorfile import safetensors_header

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            header = safetensors_header(f)[1]
        except (OSError, ValueError, struct.error):
            return None
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                total += math.prod(info.get("shape", []))
    return total


def gguf_params(path: Path) -> int | None:
    """Parameters in a GGUF file, from its tensor index (memory-mapped; no weights read)."""
    try:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader, with its fix
        return None


def model_params(path: Path) -> int | None:
    """Parameters of the model in a folder (safetensors headers) or a .gguf file (its tensor index)."""
    path = Path(path)
    return gguf_params(path) if path.suffix == ".gguf" else safetensors_params(path)


def stage_key(stage: Any) -> str:
    return f"quantize:{stage.method}" if stage.type == "quantize" else stage.type


def load_fit() -> dict:
    try:
        return json.loads(FIT.read_text())
    except (OSError, ValueError):
        return {}


def estimate(recipe: "Recipe", folder: Path, dtype: str) -> Estimate | None:
    """The estimate for ``recipe`` on the model in ``folder`` (a save_pretrained folder or a .gguf file; None when
    its size cannot be read)."""
    from .utils.memory import machine_memory

    params = model_params(folder)
    if params is None:
        return None
    lines = load_fit().get("stages", {})
    scale = 2.0 if dtype == "float32" else 1.0
    costs = []
    for stage in recipe.stages:
        line = lines.get(stage_key(stage))
        if line is None:
            costs.append(StageCost(stage_key(stage), None, None))
            continue
        a, b = line["peak_rss_bytes"]
        secs = line.get("seconds")
        costs.append(StageCost(stage_key(stage), int(a + b * scale * params),
                               max(0.0, secs[0] + secs[1] * params) if secs else None))
    return Estimate(params=params, stages=costs, machine_bytes=(machine_memory() or {}).get("total"))


def describe(est: Estimate) -> str:
    from .report.metrics import fmt_bytes

    parts = [f"{est.params / 1e9:.2f} B parameters"]
    if est.peak_bytes is not None:
        parts.append(f"estimated peak memory {fmt_bytes(est.peak_bytes)}")
    if est.seconds is not None:
        parts.append(f"about {est.seconds / 60:.0f} min on a 2-core CPU" if est.seconds >= 60
                     else f"about {est.seconds:.0f} s on a 2-core CPU")
    if est.machine_bytes:
        parts.append(f"this machine has {fmt_bytes(est.machine_bytes)}")
    missing = [s.stage for s in est.stages if s.peak_bytes is None]
    if missing:
        parts.append(f"not measured: {', '.join(dict.fromkeys(missing))}")
    return "; ".join(parts)
