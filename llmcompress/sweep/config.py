"""The sweep file schema: a base recipe, a grid and/or a list of overrides, an executor and recommendation rules.

```yaml
name: smollm2-methods
base: ../smollm2-rtn4.yaml           # a recipe file (relative to this file) or an inline recipe mapping
set: {threads: 1}                    # overrides applied to every recipe (same syntax as `run --set`)
grid:                                # cartesian product of these values
  stages.0.method: [rtn, hqq]
  stages.0.bits: [4, 8]
list:                                # explicit recipes, after the grid
  - {name: nf4, stages.0: {type: quantize, method: bnb-nf4}}
naming: "{stages.0.method}-w{stages.0.bits}"   # optional; default: the values that vary
executor: {type: local}              # or {type: ray, address: ray://head:10001, num_cpus: 1, num_gpus: 1}
markdown: ../../docs/methods.md      # optional: also the methods table (one row per method), relative to this file
recommend:
  - {pick: smallest, min_quality_recovery: 95%}
  - {pick: fastest, max_size_mib: 120}
```
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RecipeError
from ..utils.io import read_yaml
from ..utils.schema import shown_path, unknown_key

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LocalExecutorConfig(_Strict):
    """Run the recipes one after the other in this process (resumable: finished recipes are skipped)."""

    type: Literal["local"] = "local"
    retries: int = Field(0, ge=0, description="Re-runs of a recipe that failed for a reason other than bad input "
                         "(a bad recipe, a missing extra) — a flaky crash; it resumes from its last finished stage.")


class RayExecutorConfig(_Strict):
    """Each recipe a Ray task with its own CPU/GPU/memory request, on a local or remote cluster."""

    type: Literal["ray"] = "ray"
    address: str | None = Field(
        None, description="null: start a local cluster for this sweep and stop it after; `auto`: the cluster "
        "`ray start` runs on this machine; `HOST:PORT`: a cluster's GCS; `ray://HOST:10001`: Ray client.",
    )
    num_cpus: float = Field(1, gt=0, description="CPUs each recipe's task requests (match the recipes' `threads`).")
    num_gpus: float = Field(0, ge=0, description="GPUs each task requests (vLLM tensor x pipeline parallel size for "
                            "multi-GPU recipes); Ray sets CUDA_VISIBLE_DEVICES for the task.")
    memory_gib: float | None = Field(None, gt=0, description="RAM each task reserves (Ray's `memory`), in GiB.")
    retries: int = Field(1, ge=0, description="Re-runs of a task that failed for a reason other than bad input "
                         "(a crash, a lost node); it resumes from its last finished stage. Bad input is not retried.")
    max_concurrent: int | None = Field(None, ge=1, description="At most this many recipes at once (default: what "
                                       "the cluster's resources allow).")
    fresh_process: bool | None = Field(
        None, description="Run each recipe in a new worker process (its memory all goes back when it ends). Default: "
        "Ray's choice — CPU workers are reused (saves ~10-40 s of imports a recipe), GPU tasks get a new process.")
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env for the tasks, e.g. {env_vars: {LLMCOMPRESS_CACHE: /shared/cache}}.",
    )
    local_cpus: int | None = Field(None, ge=1, description="Local cluster only: its CPUs (default: all cores).")
    local_gpus: int | None = Field(None, ge=0, description="Local cluster only: its GPUs (default: all visible).")
    object_store_mib: int = Field(256, ge=80, description="Local cluster only: object store size (results are small "
                                  "JSON; models stay on disk).")

    @property
    def local(self) -> bool:
        """True when the sweep starts (and stops) its own cluster."""
        return self.address in (None, "local")


Executor = Annotated[Union[LocalExecutorConfig, RayExecutorConfig], Field(discriminator="type")]

_PICKS = {"smallest": ("size_bytes", "lower"), "fastest": ("speedup", "higher"),
          "best-quality": ("quality_recovery", "higher"), "best-accuracy": ("accuracy_recovery", "higher")}


def _fraction(v: Any) -> Any:
    """``95%`` -> 0.95; numbers stay as given."""
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            return float(v.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"not a percentage: {v!r} (write e.g. 95% or 0.95)") from None
    return v


class RecommendRule(_Strict):
    """Pick one run from the leaderboard: the best by ``pick`` among the runs that meet every bound."""

    pick: Literal["smallest", "fastest", "best-quality", "best-accuracy"] = Field(
        description="smallest (size on disk), fastest (speedup), best-quality (quality recovery), best-accuracy.")
    min_quality_recovery: float | None = Field(None, gt=0, description="e.g. 95% or 0.95 (perplexity kept).")
    min_accuracy_recovery: float | None = Field(None, gt=0, description="e.g. 0.98.")
    max_kl: float | None = Field(None, gt=0, description="Largest mean KL(original || compressed).")
    min_top1_agreement: float | None = Field(None, gt=0, le=1, description="e.g. 90%.")
    max_size_mib: float | None = Field(None, gt=0, description="Size on disk, MiB.")
    max_size_gb: float | None = Field(None, gt=0, description="Size on disk, GB (10^9 bytes).")
    min_speedup: float | None = Field(None, gt=0, description="Decode speed vs the original, e.g. 1.0.")
    title: str | None = Field(None, description="Shown instead of the rule's own wording.")

    @field_validator("min_quality_recovery", "min_accuracy_recovery", "min_top1_agreement", mode="before")
    @classmethod
    def _percent(cls, v: Any) -> Any:
        return _fraction(v)

    @property
    def objective(self) -> tuple[str, str]:
        return _PICKS[self.pick]

    def bounds(self) -> list[tuple[str, str, float]]:
        """``(row key, "min"|"max", limit)`` for each bound given (sizes in bytes)."""
        out = []
        for field, key, kind, scale in (
            ("min_quality_recovery", "quality_recovery", "min", 1), ("min_accuracy_recovery", "accuracy_recovery",
                                                                     "min", 1),
            ("max_kl", "kl_mean", "max", 1), ("min_top1_agreement", "top1_agreement", "min", 1),
            ("max_size_mib", "size_bytes", "max", 2**20), ("max_size_gb", "size_bytes", "max", 1e9),
            ("min_speedup", "speedup", "min", 1),
        ):
            value = getattr(self, field)
            if value is not None:
                out.append((key, kind, value * scale))
        return out

    def describe(self) -> str:
        if self.title:
            return self.title
        words = {"smallest": "smallest model", "fastest": "fastest model", "best-quality": "best quality",
                 "best-accuracy": "best accuracy"}[self.pick]
        parts = [text.format(getattr(self, field)) for field, text in _WORDS if getattr(self, field) is not None]
        return words + (" with " + " and ".join(parts) if parts else "")


#: How ``describe`` words each bound.
_WORDS = (
    ("min_quality_recovery", "quality recovery ≥ {:.0%}"), ("min_accuracy_recovery", "accuracy recovery ≥ {:.0%}"),
    ("max_kl", "KL ≤ {:g}"), ("min_top1_agreement", "top-1 agreement ≥ {:.0%}"), ("max_size_mib", "size ≤ {:g} MiB"),
    ("max_size_gb", "size ≤ {:g} GB"), ("min_speedup", "speedup ≥ {:g}x"),
)


class SweepConfig(_Strict):
    """A sweep: one base recipe, the overrides that make the others, where they run and how the winner is picked."""

    name: str = Field(pattern=NAME_PATTERN, max_length=200,
                      description="Sweep name; default output folder runs/sweeps/<name>.")
    base: str | dict[str, Any] = Field(description="A recipe file (relative to the sweep file) or an inline recipe.")
    set_: dict[str, Any] = Field(default_factory=dict, alias="set", description="Overrides applied to every recipe.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values: every combination.")
    list_: list[dict[str, Any]] = Field(
        default_factory=list, alias="list", description="Explicit override sets (each may carry a `name`), after "
        "the grid.")
    naming: str | None = Field(None, description="Name of each recipe from its values, e.g. "
                               "`{stages.0.method}-w{stages.0.bits}`; default: the values that vary, joined.")
    on_invalid: Literal["skip", "fail", "skip-all"] = Field(
        "skip", description="A grid combination that does not validate (e.g. bits a method lacks): `skip` lists it "
        "as skipped with the reason and runs the rest; `fail` stops before anything runs. A `list` entry that does "
        "not validate stops the sweep (it was written by hand), unless `skip-all`: then it is skipped too (a sweep "
        "over every method, some of which cannot run on this machine, e.g. CUDA-only ones).")
    executor: Executor = Field(default_factory=LocalExecutorConfig)  # type: ignore[valid-type]
    recommend: list[RecommendRule] = Field(default_factory=list, description="Rules evaluated on the board.")
    sort_by: Literal["quality_recovery", "accuracy_recovery", "size_bytes", "speedup", "kl_mean"] = Field(
        "quality_recovery", description="Leaderboard order (best first).")
    markdown: str | None = Field(
        None, description="Also write the runs as a methods table (docs/methods.md: one row per method, the original "
        "on top, how it was measured, what the rows say) to this file, relative to the sweep file. A section between "
        "`<!-- ladder:begin -->` and `<!-- ladder:end -->` already in the file is kept.")
    max_runs: int = Field(256, ge=1, le=1_000_000, description="The most recipes the grid and list may make; a "
                          "larger sweep is refused with its count before anything is expanded (a typo in a grid "
                          "can mean thousands of runs). Raise it when you mean it.")

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            _check_key(key)
            if not values:
                raise ValueError(f"grid key `{key}` has no values. Fix: list at least one, e.g. [4, 8]")
        return v

    @field_validator("set_")
    @classmethod
    def _set(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            _check_key(key)
        return v

    @field_validator("list_")
    @classmethod
    def _list(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, entry in enumerate(v):
            for key in entry:
                if key != "name":
                    _check_key(key, f"list[{i}]")
            if "name" in entry and not isinstance(entry["name"], str):
                raise ValueError(f"list[{i}]: `name` must be a string, got {entry['name']!r}")
        return v

    @model_validator(mode="after")
    def _some_points(self) -> "SweepConfig":
        if not self.grid and not self.list_:
            raise ValueError("give a `grid` (values to combine) and/or a `list` (override sets). Fix: e.g. "
                             "grid: {stages.0.bits: [4, 8]}")
        sizes = [len(v) for v in self.grid.values()]
        count = math.prod(sizes) if sizes else 0
        if count + len(self.list_) > self.max_runs:
            grid = " x ".join(map(str, sizes)) + " = " + f"{count:,} grid combinations" if sizes else ""
            listed = f"{len(self.list_)} list entries" if self.list_ else ""
            raise ValueError(
                f"this sweep means {count + len(self.list_):,} runs ({' + '.join(p for p in (grid, listed) if p)}), "
                f"over `max_runs: {self.max_runs}`. Fix: narrow the grid, or set `max_runs: "
                f"{count + len(self.list_)}` if you mean it")
        return self


def _check_key(key: str, where: str = "grid") -> None:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ValueError(f"{where}: `{key}` is not a dotted recipe key (e.g. stages.0.bits)")
    if key == "name" or key.startswith("name."):
        raise ValueError(f"{where}: the sweep names each recipe; use `naming:` or a list entry's `name:` instead "
                         "of overriding `name`")


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file. Raises RecipeError naming the file, the key and the fix."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: no such sweep file. Fix: check the path (examples: recipes/sweeps/).")
    raw = read_yaml(path, what="sweep")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a sweep is a mapping with `name`, `base` and `grid` and/or `list`.")
    raw.setdefault("name", _name_from(path))
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise RecipeError("\n".join(_line(path, err) for err in e.errors())) from None


def _name_from(path: Path) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "sweep"


def _line(path: Path, err: dict) -> str:
    loc = list(err["loc"])
    if err["type"] == "extra_forbidden":
        return unknown_key(f"{path}:", SweepConfig, loc)
    field = shown_path(SweepConfig, loc)
    if err["type"] == "missing":
        return f"{path}: `{field}` is required."
    msg = err["msg"].removeprefix("Value error, ")
    got = f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    return f"{path}: `{field}`: {msg}{got}." if field else f"{path}: {msg}."
