"""The models the app compares, loaded once at launch and shared by every session (``ModelPool``).

Where they come from: run folders under the runs directory (each run's final model, plus the original it was made
from; originals shared by several runs load once), or a single original when there is no run. Each model gets one
engine per backend, looked up by name in ``BACKENDS``: ``hf`` in this process, ``vllm`` and ``llamacpp`` as server
processes started in the background (or the reason the backend cannot run that model here).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import LLMCompressError
from ..utils.io import read_json

ORIGINAL = "original"
#: The server backends (``BACKENDS`` names) the app can start, in the order its menus list them; GGUF runs get the
#: one that runs GGUF files whatever ``--backends`` says (no other backend runs them).
SERVED = ("vllm", "llamacpp")
GGUF_BACKEND = "llamacpp"


@dataclass(frozen=True)
class Candidate:
    """A model to load: ``key`` is its column title (unique), ``path`` its folder."""

    key: str
    role: str  # "original" | "compressed"
    path: Path
    run_dir: Path | None = None
    method: str | None = None
    source: str | None = None  # how the original was named (builtin name, hub id, folder)
    peak_rss_bytes: int | None = None  # measured alone in a fresh process by the run's benchmark, if it had one


#: How deep under the runs folder run folders are looked for: ``runs/<name>``, ``runs/<group>/<name>``, and a
#: sweep's ``runs/sweeps/<sweep>/runs/<name>``.
MAX_DEPTH = 4


def find_runs(runs_dir: Path) -> list[Path]:
    """Run folders (with a manifest.json) under ``runs_dir``, up to ``MAX_DEPTH`` levels down, sorted by path.

    A run folder is not searched further (it holds stage folders, never other runs).
    """
    import os

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for top, dirs, files in os.walk(runs_dir):
        depth = len(Path(top).relative_to(runs_dir).parts)
        if depth and "manifest.json" in files:
            found.append(Path(top))
            dirs.clear()
        elif depth >= MAX_DEPTH:
            dirs.clear()
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # atomic writes' temporary folders, caches
    return sorted(found)


def run_names(runs: list[Path], runs_dir: Path | None = None) -> list[str]:
    """What the app calls each run (column titles, ``--run``, the Reports tab): its path under ``runs_dir`` in posix
    form (``tiny-rtn``, ``sweeps/w4/runs/gptq``), so two runs never share a name. Without ``runs_dir``: under the
    runs' common parent folder."""
    import os

    if not runs:
        return []
    root = Path(runs_dir) if runs_dir is not None else Path(os.path.commonpath([r.parent.resolve() for r in runs]))
    out = []
    for run in runs:
        try:
            out.append(run.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:  # not under runs_dir: its whole path, unique too
            out.append(run.as_posix())
    return out


def _original_of(run_dir: Path) -> tuple[Path | None, str | None]:
    """The original model folder of a run (from its report, else its resolved recipe) and how it was named.

    Raises LLMCompressError (the run is skipped, with the reason) when the resolved recipe names no valid model.
    """
    report_path = run_dir / "report.json"
    source = None
    if report_path.is_file():
        try:
            original = read_json(report_path)["models"]["original"]
            if Path(original["path"]).is_dir():
                meta = original.get("meta") if isinstance(original.get("meta"), dict) else {}
                return Path(original["path"]), meta.get("source") or original.get("description")
        except (ValueError, KeyError, TypeError, AttributeError):  # unreadable or odd report: the recipe says
            pass
    resolved = run_dir / "recipe.resolved.yaml"
    if resolved.is_file():
        import yaml
        from pydantic import ValidationError

        from ..models import resolve_source
        from ..models.source import materialize
        from ..recipe import ModelSpec

        try:
            doc = yaml.safe_load(resolved.read_text())
            raw = doc.get("model") if isinstance(doc, dict) else None
            spec = ModelSpec(source=raw) if isinstance(raw, str) else ModelSpec.model_validate(raw)
        except (OSError, yaml.YAMLError, ValidationError) as e:
            why = e.errors()[0]["msg"] if isinstance(e, ValidationError) else type(e).__name__
            raise LLMCompressError(f"its {resolved.name} names no valid `model:` ({why}); fix or remove the run "
                                   "folder") from None
        source = spec.source
        try:
            return materialize(resolve_source(spec.model_copy(update={"trust_remote_code": False}), run_dir)), source
        except LLMCompressError:
            return None, source
    return None, source


def _report_of(run_dir: Path) -> dict:
    try:
        return read_json(run_dir / "report.json")
    except (OSError, ValueError):
        return {}


def _peak_rss(report: dict, role: str) -> int | None:
    value = (((report.get("models") or {}).get(role) or {}).get("bench") or {}).get("peak_rss_bytes")
    return int(value) if isinstance(value, (int, float)) else None


def plan(runs: list[Path], original: str | None = None, only: tuple[str, ...] = (), max_models: int = 4,
         runs_dir: Path | None = None) -> tuple[list[Candidate], list[str]]:
    """Which models to load: originals first (one per distinct folder), then each run's final model.

    Runs are named as ``run_names(runs, runs_dir)`` names them (``only`` picks by those names). Returns
    ``(candidates, skipped)``; ``skipped`` says, per model not loaded, why (shown in the app).
    """
    from ..runs import final_model, model_of

    names = dict(zip(runs, run_names(runs, runs_dir)))
    unknown = [n for n in only if n not in names.values()]
    if unknown:
        raise LLMCompressError(
            f"app: --run {', '.join(unknown)}: no such run folder. "
            f"Fix: pick from {', '.join(sorted(names.values())) or '(none)'}"
        )
    originals: dict[Path, Candidate] = {}
    compressed: list[Candidate] = []
    skipped: list[str] = []
    if original is not None:
        path = model_of(original, "app: --original")
        originals[path.resolve()] = Candidate(_free_key(ORIGINAL, names.values()), ORIGINAL, path, source=original)
    for run, name in names.items():
        if only and name not in only:
            continue
        try:
            model = final_model(run)
        except (OSError, ValueError, LLMCompressError):
            skipped.append(f"{name}: its manifest.json cannot be read (an interrupted write?); run it again")
            continue
        if model is None or not model.is_dir():
            skipped.append(f"{name}: no compressed model (no stage produced one, or it is unfinished)")
            continue
        try:
            base, source = _original_of(run)
        except LLMCompressError as e:
            skipped.append(f"{name}: {e}")
            continue
        if base is None:
            skipped.append(f"{name}: its original model could not be found ({source or 'no recipe'})")
            continue
        report = _report_of(run)
        if original is None and base.resolve() not in originals:
            key = ORIGINAL if not originals else f"{ORIGINAL} ({Path(source or base).name})"
            key = _free_key(key, [*names.values(), *(c.key for c in originals.values())])
            originals[base.resolve()] = Candidate(key, ORIGINAL, base, source=source,
                                                  peak_rss_bytes=_peak_rss(report, "original"))
        compressed.append(Candidate(name, "compressed", model, run_dir=run, method=report.get("method"),
                                    peak_rss_bytes=_peak_rss(report, "compressed")))
    if not originals:
        path = model_of("smollm2-135m", "app: the default model")
        originals[path.resolve()] = Candidate(ORIGINAL, ORIGINAL, path, source="smollm2-135m")
    chosen = list(originals.values())
    for c in chosen[max_models:]:
        skipped.append(f"{c.key}: not loaded for chat (at most {max_models} models and there are {len(chosen)} "
                       "originals; raise --max-models, or pick runs of one original with --run NAME)")
    chosen = chosen[:max_models]
    for c in compressed:
        if len(chosen) >= max_models:
            skipped.append(f"{c.key}: not loaded for chat (at most {max_models} models; pick with --run NAME)")
        else:
            chosen.append(c)
    return chosen, skipped


def _free_key(key: str, taken) -> str:
    """``key``, primed until no other column has it (a run folder may be called "original")."""
    taken = set(taken)
    while key in taken:
        key += "'"
    return key


@dataclass
class Engine:
    """One backend of one model: ready to generate, still starting, or unable to (``reason`` says why)."""

    name: str
    backend: Any = None
    reason: str | None = None  # why this model cannot run on this backend here
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)

    def status(self) -> str | None:
        """None when ready; otherwise a sentence for the column ("starting", "cannot serve: ...")."""
        if self.reason is not None:
            return self.reason
        if not self._ready.is_set():
            started = getattr(getattr(self.backend, "server", None), "started_at", None)
            since = f" for {time.perf_counter() - started:.0f} s" if started else ""
            return f"the {self.name} engine is still starting{since}; try again shortly, or pick another backend"
        return None


@dataclass
class PoolEntry:
    """A loaded model and what the app shows about it."""

    key: str
    role: str
    path: Path
    run_dir: Path | None
    method: str | None
    size_bytes: int  # weight files on disk
    weights_bytes: int | None  # parameters and buffers in memory (hf; quantized at their packed size; GGUF: None)
    peak_rss_bytes: int | None  # peak RSS of this model alone in a fresh process (the run's benchmark), if measured
    load_s: float
    tokenizer: Any
    engines: dict[str, Engine] = field(default_factory=dict)
    describe: dict = field(default_factory=dict)  # the hf engine's settings (dtype, threads, ...; GGUF: its type)


class ModelPool:
    """Every model loaded once; sessions share it. Close it to stop its servers (``with ModelPool.load(...)``)."""

    def __init__(self, runtime: Any, entries: list[PoolEntry] | None = None, skipped: list[str] | None = None):
        self.runtime = runtime
        self.entries: list[PoolEntry] = entries or []
        self.skipped: list[str] = skipped or []
        self.servers: list[Any] = []
        self.active = 0  # chat requests generating now (shown beside race results)
        self._lock = threading.Lock()
        self._servers_lock = threading.Lock()  # servers start in background threads while the pool may close
        self._closed = False

    @classmethod
    def load(cls, candidates: list[Candidate], runtime: Any, backends: tuple[str, ...] = ("hf",),
             skipped: list[str] | None = None, log: Callable[[str], None] = print, slots: int = 1) -> "ModelPool":
        """Load every candidate with the hf backend (a GGUF run: its tokenizer only); start vLLM and llama.cpp
        servers (in the background) when asked for, and a llama.cpp one for every GGUF run.

        ``slots``: requests one llama-server runs at once (the race's largest batch, the chat concurrency).
        """
        pool = cls(runtime, skipped=skipped)
        try:
            for c in candidates:
                pool.entries.append(pool._load_gguf(c, log) if is_gguf(c.path) else pool._load_hf(c, log))
            for name in SERVED:
                for entry in pool.entries:
                    if name in backends or (name == GGUF_BACKEND and is_gguf(entry.path)):
                        overrides = {"parallel": max(1, int(slots))} if name == GGUF_BACKEND else {}
                        entry.engines[name] = pool._start_server(entry, name, log, **overrides)
        except BaseException:
            pool.close()
            raise
        return pool

    def _load_hf(self, c: Candidate, log: Callable[[str], None]) -> PoolEntry:
        from ..backends import BACKENDS
        from ..context import ModelHandle, weight_bytes

        t0 = time.perf_counter()
        backend = BACKENDS.get("hf").open(ModelHandle(c.role, c.path, self.runtime))
        load_s = time.perf_counter() - t0
        engine = Engine("hf", backend)
        engine._ready.set()
        entry = PoolEntry(key=c.key, role=c.role, path=c.path, run_dir=c.run_dir, method=c.method,
                          size_bytes=weight_bytes(c.path), weights_bytes=backend.param_bytes(),
                          peak_rss_bytes=c.peak_rss_bytes, load_s=load_s, tokenizer=backend.tokenizer,
                          engines={"hf": engine}, describe=backend.describe())
        log(f"loaded {c.key} ({c.path}) in {load_s:.1f} s")
        return entry

    def _load_gguf(self, c: Candidate, log: Callable[[str], None]) -> PoolEntry:
        """A GGUF run: no transformers model (its hf engine says why); the tokenizer of its folder, for the chat's
        limits. Its llamacpp engine is started by ``load``."""
        from ..context import weight_bytes
        from ..models.loading import read_meta

        t0 = time.perf_counter()
        tokenizer = _tokenizer_of(c.path, c.key, log)
        load_s = time.perf_counter() - t0
        gguf_type = read_meta(c.path).get("gguf_type")
        kind = f"{gguf_type} GGUF" if isinstance(gguf_type, str) and gguf_type else "GGUF"  # "Q4_K_M GGUF"
        reason = f"a {kind} file runs under llama.cpp, not transformers: pick the llamacpp backend"
        entry = PoolEntry(key=c.key, role=c.role, path=c.path, run_dir=c.run_dir, method=c.method,
                          size_bytes=weight_bytes(c.path), weights_bytes=None, peak_rss_bytes=c.peak_rss_bytes,
                          load_s=load_s, tokenizer=tokenizer, engines={"hf": Engine("hf", reason=reason)},
                          describe={"dtype": kind})
        log(f"found {c.key} ({c.path}): a {kind} file, served by llama.cpp")
        return entry

    def _start_server(self, entry: PoolEntry, name: str, log: Callable[[str], None], **overrides: Any) -> Engine:
        """An engine of the server backend ``name`` (``BACKENDS``) for the entry, opened and started in the
        background (llamacpp converts a dense folder to F16 GGUF first: cached, tens of seconds the first time). A
        model the backend cannot run gets the reason: at once when the backend can tell from the folder
        (``unservable``), else when ``open`` raises ``Unservable``."""
        from ..backends import BACKENDS
        from ..context import ModelHandle

        cls = BACKENDS.get(name)
        handle = ModelHandle(entry.role, entry.path, self.runtime)
        why = cls.unservable(handle) if hasattr(cls, "unservable") else None
        if why is not None:
            return Engine(name, reason=why)
        engine = Engine(name)

        def start() -> None:
            if self._open(engine, cls, handle, entry.key, log, overrides):
                _watch(engine, entry.key, cls.title, cls.server_label, log)

        threading.Thread(target=start, daemon=True, name=f"{name}-start-{entry.key}").start()
        return engine

    def _open(self, engine: Engine, cls: Any, handle: Any, key: str, log: Callable[[str], None],
              overrides: dict) -> bool:
        """Open the backend ``cls`` into ``engine``; on failure set its reason. True when it opened."""
        from ..serving.support import Unservable

        try:
            engine.backend = cls.open(handle, ctx=self, **overrides)
            return True
        except Exception as e:  # noqa: BLE001 - any failure must end "starting": the engine says why instead
            why = str(e) if isinstance(e, LLMCompressError) else f"{type(e).__name__}: {e}"
            engine.reason = (f"{cls.title} cannot run this model: {why}" if isinstance(e, Unservable)
                             else f"the {cls.title} engine could not start: {why}")
            log(f"{cls.title} failed for {key}: {why}")
            return False

    def engine(self, path: Path, options: Any, make: Callable[[Path], Any], kind: str = "vllm") -> Any:
        """What ``VLLMBackend.open`` and ``LlamaCppBackend.open`` ask their context for: a started server, owned (and
        closed) by the pool. ``kind`` (vllm, llama-server) names its log file."""
        from ..utils.cache import cache_dir

        with self._servers_lock:
            if self._closed:
                raise LLMCompressError(f"app: the model pool is closed; no {kind} server is started for {path}. "
                                       "Fix: restart the app.")
            log = cache_dir("logs", f"app-{kind}-{int(time.time())}-{len(self.servers)}-{Path(path).parent.name}.log")
            server = make(log).start()
            self.servers.append(server)
        return server

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def get(self, key: str) -> PoolEntry:
        for e in self.entries:
            if e.key == key:
                return e
        from .config import LimitExceeded

        raise LimitExceeded(f"unknown model {key!r}; this app serves {', '.join(self.keys())}.")

    @property
    def backends(self) -> list[str]:
        """Backend names some model has (hf always)."""
        return ["hf", *(name for name in SERVED if any(name in e.engines for e in self.entries))]

    def busy(self, delta: int) -> None:
        with self._lock:
            self.active += delta

    def close(self) -> None:
        """Stop every server (vLLM, llama-server) this pool started and drop the models. Safe to call twice."""
        with self._servers_lock:
            self._closed = True
            servers, self.servers = self.servers, []
        while servers:
            servers.pop().close()
        self.entries.clear()
        import gc

        gc.collect()

    def __enter__(self) -> "ModelPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_gguf(path: Path) -> bool:
    """Whether a model folder is a GGUF one of ours (``llmcompress.json`` says ``format: gguf``)."""
    from ..models.loading import read_meta

    try:
        return read_meta(Path(path)).get("format") == "gguf"
    except (OSError, ValueError, AttributeError):  # an unreadable llmcompress.json: loading it says why
        return False


def _tokenizer_of(path: Path, key: str, log: Callable[[str], None]) -> Any:
    """The tokenizer in a GGUF run's folder (never remote code), or None, logged, when it has none: the chat then
    skips its template and context checks (llama-server applies the template in the GGUF file)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        log(f"{key}: no tokenizer in {path} ({type(e).__name__}: {e}); the chat's context check is skipped for it. "
            "Fix: re-run the run's gguf stage, which copies the tokenizer files next to model.gguf")
        return None


def _watch(engine: Engine, key: str, short: str, label: str, log: Callable[[str], None]) -> None:
    """Wait for ``engine``'s server (in a background thread): ready, or its reason says why it failed."""
    try:
        engine.backend.ready()
        log(f"{short} ready for {key} in {engine.backend.server.ready_s:.0f} s")
        engine._ready.set()
    except Exception as e:  # noqa: BLE001 - any failure must end "starting": the engine says why instead
        why = str(e) if isinstance(e, LLMCompressError) else f"{type(e).__name__}: {e}"
        engine.reason = f"{label} failed to start: {why}"
        log(f"{short} failed for {key}: {why}")
