"""What a stage sees while it runs: the recipe, the run folder, the original and current models, progress and caches.

No global state: the pipeline builds one RunContext per run and hands it to each stage.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .utils.cache import cache_dir
from .utils.io import atomic_dir, atomic_write_json, file_lock, read_json, stable_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: ``<run folder>/checkpoints/<stage folder>``: checkpoints of a stage not finished yet (RunContext.checkpoint_dir).
CHECKPOINTS = "checkpoints"


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files under ``folder`` (tokenizer and configs aside)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them torch emulates bf16 matmuls on CPU, far slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def auto_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "float32"


@dataclass(frozen=True)
class Runtime:
    """How models run in this process; every report line carries these."""

    device: str
    threads: int
    dtype: str
    seed: int

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Runtime":
        """``recipe``: a ``recipe.Recipe`` (not imported here: the recipe imports the stages, which take a context)."""
        import torch

        device = recipe.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        threads = recipe.threads or max(1, (os.cpu_count() or 2) // 2)
        dtype = recipe.dtype if recipe.dtype != "auto" else auto_dtype(device)
        return cls(device=device, threads=threads, dtype=dtype, seed=recipe.seed)

    def apply(self) -> None:
        """Set torch threads and seeds (call before each stage so stages are reproducible on their own)."""
        import numpy as np
        import torch

        torch.set_num_threads(self.threads)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)

    def describe(self) -> dict[str, Any]:
        import torch

        out = {"device": self.device, "threads": self.threads, "dtype": self.dtype, "seed": self.seed}
        if self.device == "cuda":
            out["gpu"] = torch.cuda.get_device_name(0)
        else:
            import platform

            out["cpu"] = platform.processor() or platform.machine()
            out["cpu_count"] = os.cpu_count()
        return out


class ModelHandle:
    """A model folder plus a lazily loaded in-memory copy. ``role`` is "original" or "compressed"."""

    def __init__(
        self, role: str, path: Path, runtime: Runtime, meta: dict | None = None, load_kwargs: dict | None = None
    ):
        self.role = role
        self.path = Path(path)
        self.runtime = runtime
        self.load_kwargs = load_kwargs or {}
        from .models.loading import read_meta

        self.meta = meta if meta is not None else read_meta(self.path)
        self._loaded: tuple[Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loaded once and kept until ``release()``."""
        if self._loaded is None:
            from .models.loading import load_model

            self._loaded = load_model(self.path, self.runtime.device, self.runtime.dtype, **self.load_kwargs)
        return self._loaded

    def release(self) -> None:
        if self._loaded is None:
            return
        self._loaded = None
        import gc

        from .utils.memory import trim

        gc.collect()
        trim()

    @property
    def size_bytes(self) -> int:
        """Bytes of the weight files on disk (what a user downloads, tokenizer and configs aside)."""
        return weight_bytes(self.path)

    def fingerprint(self) -> str:
        """Identifies the weights (file names, sizes, mtimes) plus how they load, for result caches."""
        files = sorted(
            (str(p.relative_to(self.path)), p.stat().st_size, int(p.stat().st_mtime))
            for p in self.path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + (".json",)
        )
        return stable_hash([files, self.meta.get("format"), self.runtime.dtype, self.runtime.device])

    def describe(self) -> str:
        return self.meta.get("method") or self.meta.get("source") or str(self.path)


@dataclass
class RunContext:
    """Shared by all stages of one run."""

    recipe: Any  # recipe.Recipe (not imported: recipe -> stage -> context)
    run_dir: Path
    runtime: Runtime
    original: ModelHandle
    current: ModelHandle
    console: Any = None  # rich Console
    progress: Any = None  # rich Progress (or None when quiet)
    stage_index: int = 0
    stage_dir: Path = field(default_factory=Path)
    results: dict[int, Any] = field(default_factory=dict)  # stage index -> StageResult of earlier stages
    fingerprint: str = ""  # the running stage's (pipeline.fingerprints): what its checkpoints must match
    engines: dict[str, Any] = field(default_factory=dict)  # serving engines kept for the run (see ``engine``)
    #: ``(models.family.Family, task)`` of the run's model: set once by the pipeline, else resolved on first use.
    family_task: tuple[Any, str | None] | None = None

    @property
    def family(self) -> Any:
        """The run's model family (llm, vision, vlm, ...): its loader, its stage implementations."""
        return self._family_task()[0]

    @property
    def model_task(self) -> str | None:
        """The run's model task (vision models: image-classification, object-detection), else None."""
        return self._family_task()[1]

    def _family_task(self) -> tuple[Any, str | None]:
        if self.family_task is None:
            from .models.kind import run_family

            self.family_task = run_family(self.recipe.model, self.original.path)
        return self.family_task

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.log(message)

    @property
    def checkpoint_dir(self) -> Path:
        """``<run folder>/checkpoints/<stage folder>``: where a long stage keeps checkpoints that must survive a
        kill (its own folder is replaced when it runs again); removed once the stage has finished."""
        return self.run_dir / CHECKPOINTS / self.stage_dir.name

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        """A progress bar for one long step: ``with ctx.task("eval", total=n) as advance: advance(1)``."""
        if self.progress is None:
            yield lambda *a, **k: None
            return
        tid = self.progress.add_task(description, total=total)

        def advance(n: float = 1, description: str | None = None) -> None:
            self.progress.update(tid, advance=n, **({"description": description} if description else {}))

        try:
            yield advance
        finally:
            self.progress.update(tid, completed=total or 0, visible=False)
            self.progress.remove_task(tid)

    @contextmanager
    def new_model_dir(self) -> Iterator[Path]:
        """A temporary folder to save the stage's model into; on success it becomes ``<stage dir>/model``."""
        with atomic_dir(self.stage_dir / "model") as tmp:
            yield tmp

    def set_current(self, path: Path, loaded: tuple[Any, Any] | None = None) -> None:
        """Make the folder ``path`` the model later stages work on (the "compressed" model of the report).

        ``loaded``: the ``(model, tokenizer)`` already in memory for that folder, to save a reload.
        """
        if self.current.path == Path(path) and loaded is None:
            return
        if self.current is not self.original:
            self.current.release()
        self.current = ModelHandle("compressed", path, self.runtime)
        self.current._loaded = loaded

    def engine(self, path: Path, options: Any, make: Callable[[Path], Any], kind: str = "vllm") -> Any:
        """A serving engine (e.g. a vLLM server) for ``path`` with ``options``, started once per run and reused.

        ``make(log_path)`` builds it; it is started here and stopped by ``close_engines`` when the run ends.
        ``kind`` names it in the log file's name and the messages (vllm, llama-server).
        """
        key = stable_hash([str(Path(path).resolve()), repr(options)])
        if key not in self.engines or not self.engines[key].alive():
            if key in self.engines:  # it died (OOM, a crash): its engine-core children may not have
                self.engines[key].close()
            log = self.run_dir / "logs" / f"{kind}-{len(self.engines)}-{Path(path).parent.name}.log"
            self.log(f"starting a {'vLLM server' if kind == 'vllm' else kind} for {path} (log: {log})")
            self.engines[key] = make(log).start()
        return self.engines[key]

    def close_engines(self) -> None:
        """Stop every engine this run started (no process or port is left behind)."""
        while self.engines:
            _, engine = self.engines.popitem()
            engine.close()

    def load(self, handle: ModelHandle) -> tuple[Any, Any]:
        """``handle.load()`` with the run's other model released first: one model in memory at a time."""
        for other in (self.original, self.current):
            if other is not handle:
                other.release()
        return handle.load()

    def working_copy(self) -> tuple[Any, Any]:
        """A private copy of the current model to change in place: loaded afresh from its folder, with the run's
        models released first, so a stage never holds the source and its copy at once. (Weights that load
        memory-mapped are copy-on-write: changing them never touches the folder.)"""
        from .models.loading import load_model

        self.original.release()
        self.current.release()
        return load_model(self.current.path, self.runtime.device, self.runtime.dtype, **self.current.load_kwargs)

    def baseline_path(self, kind: str, config: Any, suffix: str = ".json") -> Path:
        """Where results of the *original* model for (model fingerprint, kind, config, versions) are cached."""
        from .models.loading import versions

        key = stable_hash([self.original.fingerprint(), kind, config, versions(methods=False), self.runtime.describe()])
        return cache_dir("baseline", f"{kind}-{key}{suffix}")

    def baseline(self, kind: str, config: Any, compute: Callable[[], dict]) -> dict:
        """Results of the *original* model, cached across runs by (model fingerprint, kind, config, versions)."""
        path = self.baseline_path(kind, config)
        # Locked: recipes of a sweep running at once wait for the first to compute it instead of each computing it.
        with file_lock(path.with_name(path.name + ".lock")):
            if path.is_file():
                try:
                    return read_json(path)
                except ValueError:
                    path.unlink(missing_ok=True)  # a torn file from another writer: recompute
            result = compute()
            atomic_write_json(path, result)
        return result
