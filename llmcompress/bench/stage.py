"""The benchmark stage: size, memory, time to first token and decode speed of the original and the compressed model.

Fair ratios: every (backend, model) pair is timed in one loop, interleaved call by call (original, compressed,
original, ...) after warm-up, so load on a shared machine hits all alike: hf models run ``generate`` in this process,
vllm models are vLLM servers (one child process each) driven from here over HTTP. Figures are medians over rounds;
the ratio of a timed figure is the median of its per-round compressed/original ratios (the two calls of a pair ran
back to back, so slow drift of the machine's load cancels), the ratio of a size or memory figure is a plain quotient.
Every call is kept. Memory and load time: for hf from a fresh process per model (``bench/memory.py``), so one model's
memory never shows in the other's figures; for vllm from each server's own process tree.
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import RecipeError
from ..serving.config import VLLMConfig
from ..stage import StageConfig, StageResult, by_family
from .load import LoadConfig

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext

#: Tokens the memory probe generates (batch 1, `prompt_tokens` prompt): enough to reach decode's peak, cheap.
PROBE_NEW_TOKENS = 4


#: Largest batch size timed (a typo such as 100000000 would allocate prompts for that many sequences).
MAX_BATCH = 4096


class BenchmarkStage(StageConfig):
    """Speed, memory and size of the original and the compressed model, measured side by side, per backend.

    Recipe sample::

        - type: benchmark
          backends: [hf]           # [hf, vllm]: also a vLLM server per model (`llmcompress setup vllm` installs it)
          batch_sizes: [1, 8]      # concurrent requests; the largest gives the TTFT/ITL percentiles
          prompt_tokens: 16
          new_tokens: 16
          repeats: 3
          warmup: 1
          memory: true
          paired: rounds           # one model in memory at a time (calls: all at once, alternating call by call)
          compare: []              # more models: run folders, model folders, or recipe files (run first)
          vllm: {}                 # engine settings, e.g. {kv_cache_gib: 1, tensor_parallel_size: 2}
          load: null               # load curves under vllm: {rates: [1, 2, 4, inf], num_prompts: 32, slo: {...}}

    Prompts are windows of real text (Python's reference docs), the same for every model and backend; generation
    is greedy and always exactly ``new_tokens`` long (``ignore_eos`` under vLLM). Every (backend, model) pair is
    timed in one interleaved loop, so ratios between models and between backends are paired, round by round.

    Figures per backend and model: ``size_bytes`` (weight files), ``param_bytes`` (weights in memory; vLLM: what it
    reports loading); memory: hf from a fresh process per model (``load_s``, ``peak_rss_bytes``, ...), vLLM from the
    server's process tree (``load_s`` = start to ready, ``peak_rss_bytes`` sampled). At the smallest batch size:
    ``ttft_ms``, ``prefill_tok_s``, ``decode_ms_per_token_bs{B}``; at every batch size: ``decode_tok_s_bs{B}``,
    ``output_tok_s_bs{B}`` (offline throughput: batch x new_tokens / wall time), ``requests_per_s_bs{B}``; at the
    largest: ``ttft_p50_ms``/``ttft_p95_ms`` and ``itl_p50_ms``/``itl_p95_ms`` over every request of every round.
    A model vLLM cannot serve here (e.g. W4A16 on a CPU without AVX-512) is listed with the reason, not timed.

    ``load:`` (backend vllm) adds load curves: vLLM's own ``vllm bench serve`` against each model's server at each
    request rate (``bench/load.py``): request and output token throughput, TTFT/TPOT/ITL/E2E p50/p90/p99 and
    goodput under ``slo``, per rate, in ``data["load"]``; the tool's result files stay in ``<stage>/load/``.
    """

    type: Literal["benchmark"] = "benchmark"
    backends: list[Literal["hf", "vllm", "llamacpp"]] = Field(
        default_factory=lambda: ["hf"], description="Generation engines: hf = transformers `generate`, "
        "vllm = a vLLM server per model (`llmcompress setup vllm` installs it), llamacpp = llama-server per GGUF "
        "(`llmcompress setup llamacpp`; a dense model runs as its F16 GGUF). The first that runs both models fills "
        "the report's original-vs-compressed tables; all appear in its serving table."
    )
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 8], description="Batch sizes to time decode at (sorted; the smallest gives TTFT)."
    )
    prompt_tokens: int = Field(
        16, le=131_072, description="Tokens per prompt (every sequence of a batch has exactly this many).")
    new_tokens: int = Field(
        16, le=32_768, description="Tokens generated per sequence (greedy, forced with min_new_tokens); >= 2.")
    repeats: int = Field(3, le=1000, description="Timed rounds per model; figures are medians over rounds.")
    warmup: int = Field(
        1, le=100,
        description="Untimed calls per model before timing, at the smallest batch size (the first call is slower).",
    )
    memory: bool = Field(True, description="Measure load time and peak RSS, one fresh process per model.")
    paired: Literal["rounds", "calls"] = Field(
        "rounds", description="How models take turns under hf: `rounds` = one model in memory at a time, models "
        "alternating round by round (each load followed by an untimed call), so the run never holds two models; "
        "`calls` = every model in memory at once, alternating call by call (the tightest pairing, when memory is "
        "plentiful). Server backends (vllm, llamacpp) run in their own processes either way."
    )
    compare: list[str] = Field(
        default_factory=list, description="More models to measure beside the compressed one: run folders (their "
        "final model), model folders, or recipe files (run, or resumed, into runs/<name> first). Paths are "
        "relative to the recipe file."
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (backend vllm).")
    load: LoadConfig | None = Field(
        None, description="Load curves of the vLLM servers: `vllm bench serve` at each request rate (throughput, "
        "TTFT/TPOT/ITL percentiles, goodput under `slo`); None: off. Needs backend vllm.")

    @model_validator(mode="before")
    @classmethod
    def _backend_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "backend" in data:  # the single-backend spelling of earlier recipes
            if "backends" in data:
                raise ValueError("give `backends: [...]` only (`backend` is its one-engine spelling)")
            data = {**data, "backends": [data["backend"]]}
            del data["backend"]
        return data

    @model_validator(mode="after")
    def _vllm_needs_its_backend(self) -> "BenchmarkStage":
        if self.vllm != VLLMConfig() and "vllm" not in self.backends:  # defaults (`vllm: {}`, a resolved recipe) pass
            raise ValueError(f"`vllm:` settings apply to backend vllm only, and `backends` is {self.backends}. "
                             "Fix: add vllm to `backends`, or remove the `vllm:` block.")
        if self.load is not None and "vllm" not in self.backends:
            raise ValueError(f"`load:` sweeps request rates against vLLM servers, and `backends` is {self.backends}. "
                             "Fix: add vllm to `backends`, or remove the `load:` block.")
        return self

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"needs one or more distinct backends, e.g. [hf, vllm]; got {v}")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one batch size, e.g. [1, 8]")
        if any(b < 1 or b > MAX_BATCH for b in v):
            raise ValueError(f"batch sizes must be between 1 and {MAX_BATCH}, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"batch sizes must be distinct, got {v}")
        return sorted(v)

    @field_validator("prompt_tokens", "repeats")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("new_tokens")
    @classmethod
    def _new_tokens(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2 (the first token counts as time to first token, the rest as decode)")
        return v

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (0 = no warm-up call)")
        return v

    def preflight(self, base_dir: "Path | None" = None) -> None:
        """vLLM installed (its own environment is fine), and every `compare` entry there, before any model loads."""
        where = f"stages (benchmark{': ' + self.name if self.name else ''})"
        for entry in self.compare:
            path = Path(entry).expanduser()
            if not path.is_absolute() and base_dir is None:
                continue
            path = path if path.is_absolute() else base_dir / path
            recipe = path.suffix in (".yaml", ".yml")
            if not (path.is_file() if recipe else path.is_dir()):
                what = "recipe file" if recipe else "run or model folder"
                why = "does not exist" if not path.exists() else f"is not a {'file' if recipe else 'folder'}"
                raise RecipeError(f"{where}: compare: {what} `{path}` {why}. Fix: correct the path "
                                  "(relative to this recipe's folder).")
            if recipe and _compares_itself(path):
                raise RecipeError(f"{where}: compare: `{path}` benchmarks against itself (its own benchmark stage "
                                  "lists it in `compare`): running it would never end. Fix: compare other recipes.")
        from ..backends import BACKENDS

        for name in self.backends:  # an engine that needs its own install says so now (e.g. llama.cpp not set up)
            cls = BACKENDS.get(name)
            if hasattr(cls, "preflight"):
                cls.preflight(f"{where}: backend {name}")

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        import torch

        t0 = time.perf_counter()
        torch.set_num_threads(ctx.runtime.threads)  # deliberate: on a shared 2-core box 2 threads ran 4-10x slower
        self.preflight()
        same = ctx.current is ctx.original
        handles = {"original": ctx.original} if same else {"original": ctx.original, "compressed": ctx.current}
        handles.update(self._compare_handles(ctx, handles))
        where = self.label  # the pipeline prefixes the recipe file and stage index
        backends, unsupported = self._open(ctx, handles, where)  # starts servers, loads and checks every model
        calls_per_model = self.warmup + self.repeats * len(self.batch_sizes)
        probes = [k for k, b in backends.items() if self.memory and b.memory() is None]
        served = {k: b for k, b in backends.items() if self.load and k.split("/")[0] == "vllm"}
        with ctx.task(f"{self.label} ({', '.join(self.backends)})",
                      total=len(probes) + calls_per_model * len(backends)
                      + len(served) * len(self.load.rates if self.load else [])) as advance:
            memory = {k: self._memory(ctx, handles[_role(k)], advance) for k in probes}
            calls = self.time_interleaved(backends, advance)
            load = self._load(ctx, served, advance) if served else None
        for key, backend in backends.items():  # vLLM: measured by the server's own process tree, after the load
            if self.memory and key not in memory:
                memory[key] = backend.memory()
        per_repeat = {k: _per_repeat(calls, k, self.batch_sizes) for k in backends}
        results: dict[str, dict[str, Any]] = {}
        for name in self.backends:
            figs = {role: self._figures(h, backends[f"{name}/{role}"], memory.get(f"{name}/{role}"),
                                        per_repeat[f"{name}/{role}"])
                    for role, h in handles.items() if f"{name}/{role}" in backends}
            if same and "original" in figs:
                figs["compressed"] = dict(figs["original"])
            ratios = {role: self._ratios(figs, per_repeat, name, role)
                      for role in figs if role != "original" and "original" in figs}
            engines = [b.describe() for k, b in backends.items() if k.startswith(name + "/")]
            results[name] = {"engine": engines[0] if engines else {}, "figures": figs, "ratios": ratios,
                             "unsupported": {r: why for (b, r), why in unsupported.items() if b == name}}
        # The report's original-vs-compressed tables: the first backend that ran both (hf cannot run a GGUF file).
        table = next((n for n in self.backends if {"original", "compressed"} <= set(results[n]["figures"])),
                     self.backends[0])
        first = results[table]
        data = {
            "settings": {**self._settings(ctx, backends), "table_backend": table},
            "same_model": same,
            "models": {role: h.describe() for role, h in handles.items()} | (
                {"compressed": ctx.current.describe()} if same else {}),
            "original": first["figures"].get("original", {}),
            "compressed": first["figures"].get("compressed", {}),
            "ratios": first["ratios"].get("compressed", {}),
            "backends": results,
            "cross": _cross(per_repeat, self.backends, list(handles)) if len(self.backends) > 1 else {},
            "raw": {"calls": calls, "per_repeat": per_repeat, "memory": memory},
        }
        if load is not None:
            data["load"] = load
        seconds = time.perf_counter() - t0
        return StageResult(type="benchmark", label=self.label, seconds=seconds, data=data,
                           summary=summarize(first["figures"].get("original", {}),
                                             first["figures"].get("compressed", {}),
                                             first["ratios"].get("compressed", {}), same) | _serving_summary(data)
                           | _load_summary(load))

    def _load(self, ctx: "RunContext", served: dict[str, Any], advance) -> dict:
        """``bench.load.run_load`` over the vLLM servers the stage timed (they are still up), rate by rate."""
        from ..serving.server import ServerOptions
        from .load import run_load

        ctx.log(f"benchmark: load curves of {', '.join(served)} at request rates "
                f"{', '.join(map(str, self.load.rates))} (vllm bench serve)")
        rt = ctx.runtime
        env = {**os.environ, **ServerOptions(device=rt.device, threads=rt.threads).env()}
        env.pop("VLLM_API_KEY", None)
        env.pop("OPENAI_API_KEY", None)  # the tool sends $OPENAI_API_KEY: only the servers' own key, if any
        out = run_load(self.load, served, ctx.stage_dir / "load", ctx.run_dir / "logs" / "vllm-bench-serve.log",
                       rt.seed, env, self.label, advance)
        out["settings"].update(rt.describe())  # device, dtype, threads: beside every figure
        return out

    def _compare_handles(self, ctx: "RunContext", taken: dict) -> dict[str, "ModelHandle"]:
        from ..context import ModelHandle

        out: dict[str, ModelHandle] = {}
        for i, entry in enumerate(self.compare):
            where = f"compare[{i}] `{entry}`"
            name, path = _resolve_compare(ctx, entry, where)
            if name in taken or name in out:
                name = f"{name}-{i}"
            out[name] = ModelHandle(name, path, ctx.runtime)
        return out

    def _open(self, ctx: "RunContext", handles: dict, where: str) -> tuple[dict[str, Any], dict]:
        """``{"backend/role": backend}`` for every pair vLLM (or hf) can run, and ``{(backend, role): why}`` else."""
        from ..backends import BACKENDS
        from ..serving.support import Unservable

        backends, unsupported = {}, {}
        if self.paired == "rounds":  # one model in memory at a time: none is held when the stage starts
            for handle in (ctx.original, ctx.current, *handles.values()):
                handle.release()
        for name in self.backends:
            cls = BACKENDS.get(name)
            extra = cls.bench_settings(self, ctx.runtime, len(handles)) if hasattr(cls, "bench_settings") else {}
            for role, handle in handles.items():
                try:
                    backends[f"{name}/{role}"] = b = cls.open(handle, ctx, **extra)
                except Unservable as e:
                    unsupported[(name, role)] = str(e)
                    ctx.log(f"benchmark: {role} is not timed under {name}: {e}")
                    continue
                if self.paired == "rounds" and hasattr(b, "suspend"):
                    b.check(self.prompt_tokens, self.new_tokens, where=where)
                    b.suspend()
        for b in backends.values():  # servers started above in parallel; this waits for each
            if not getattr(b, "suspended", False):
                b.check(self.prompt_tokens, self.new_tokens, where=where)
        if "vllm/original" not in backends and "vllm" in self.backends:
            ctx.log("benchmark: vLLM cannot serve the original here, so no vLLM ratios")
        return backends, unsupported

    def _memory(self, ctx: "RunContext", handle: "ModelHandle", advance) -> dict:
        """The memory probe's JSON. The original's is cached across runs (same weights, settings and versions)."""
        from .memory import measure_memory

        fresh = []

        def probe() -> dict:
            ctx.log(f"benchmark: load time and memory of the {handle.role} model, in a fresh process")
            fresh.append(True)
            return measure_memory(handle.path, ctx.runtime.device, ctx.runtime.dtype, ctx.runtime.threads,
                                  prompt_tokens=self.prompt_tokens, new_tokens=PROBE_NEW_TOKENS)

        if handle is ctx.original:
            key = {"backend": "hf", "prompt_tokens": self.prompt_tokens, "new_tokens": PROBE_NEW_TOKENS}
            result = ctx.baseline("bench-memory", key, probe)
        else:
            result = probe()
        advance(1, description=f"benchmark: memory of the {handle.role} model")
        return {**result, "cached": not fresh}

    def time_interleaved(self, backends: dict[str, Any], advance=lambda *a, **k: None) -> list[dict]:
        """Time every (round, batch size), alternating models call by call (``paired: calls``) or round by round,
        with one hf model in memory at a time (``rounds``). Returns one dict per call, in order."""
        prompts = {key: {bs: b.prompts(bs, self.prompt_tokens) for bs in self.batch_sizes}
                   for key, b in backends.items()}
        # Warm-up at the smallest batch only: measured on CPU, the very first call is ~10% slow and the first call
        # at a larger batch is not, while a bf16 warm-up at batch 8 costs ~10 s per model on a 2-core box.
        plan = [("warmup", r, [self.batch_sizes[0]]) for r in range(self.warmup)]
        plan += [("timed", r, self.batch_sizes) for r in range(self.repeats)]
        calls = []

        def call(phase: str, r: int, bs: int, key: str) -> None:
            gc.disable()  # no collector pause inside a timed call
            try:
                timing = backends[key].generate(prompts[key][bs], self.new_tokens)
            finally:
                gc.enable()
            calls.append({"phase": phase, "repeat": r, "role": key, **timing.as_dict()})
            advance(1, description=f"benchmark: {phase} {r + 1}, batch {bs}, {key}")

        for phase, r, batch_sizes in plan:
            gc.collect()  # once a round: a full collection costs ~0.2 s with torch and transformers loaded
            if self.paired == "calls":
                for bs in batch_sizes:
                    for key in backends:
                        call(phase, r, bs, key)
                continue
            for key, backend in backends.items():
                if self._take_turn(backends, key) and phase == "timed":
                    backend.generate(prompts[key][batch_sizes[0]], self.new_tokens)  # untimed: a reload's first
                for bs in batch_sizes:
                    call(phase, r, bs, key)
        return calls

    @staticmethod
    def _take_turn(backends: dict[str, Any], key: str) -> bool:
        """Make ``key``'s model the only hf model in memory; True when it had to be loaded again."""
        if not hasattr(backends[key], "resume"):
            return False
        for other, b in backends.items():
            if other != key and hasattr(b, "suspend"):
                b.suspend()
        return backends[key].resume()

    def _figures(self, handle: "ModelHandle", backend: Any, memory: dict | None, per_repeat: dict) -> dict:
        out: dict[str, Any] = {"size_bytes": handle.size_bytes}
        param = backend.param_bytes()
        if param is not None:
            out["param_bytes"] = param
        if memory:
            out.update(load_s=memory["load_s"], peak_rss_bytes=memory["peak_rss_bytes"])
            if "rss_base_bytes" in memory:
                out.update(rss_load_bytes=memory["rss_load_bytes"],
                           peak_rss_model_bytes=memory["peak_rss_bytes"] - memory["rss_base_bytes"])
            if "peak_gpu_bytes" in memory:
                out["peak_gpu_bytes"] = memory["peak_gpu_bytes"]
        out.update({k: round(statistics.median(v), 4) for k, v in per_repeat.items()})
        return out

    def _ratios(self, figs: dict, per_repeat: dict, backend: str, role: str) -> dict[str, float | None]:
        """role / original: paired per-round medians for timings, plain quotients for sizes and memory."""
        ratios = {k: _ratio(figs[role].get(k), v) for k, v in figs["original"].items() if k in figs[role]}
        paired = _paired(per_repeat.get(f"{backend}/original", {}), per_repeat.get(f"{backend}/{role}", {}))
        ratios.update({k: round(statistics.median(v), 4) for k, v in paired.items() if v and None not in v})
        return ratios

    def _settings(self, ctx: "RunContext", backends: dict[str, Any]) -> dict:
        from ..backends.prompts import SOURCE

        ids = [b.prompts(self.batch_sizes[0], self.prompt_tokens) for b in backends.values()]
        return {
            "backends": list(self.backends), "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "batch_sizes": list(self.batch_sizes), "repeats": self.repeats, "warmup": self.warmup,
            "paired": self.paired, **ctx.runtime.describe(),
            "ttft_batch_size": self.batch_sizes[0], "latency_batch_size": self.batch_sizes[-1],
            "prompt_source": SOURCE, "same_prompt_ids": all(i == ids[0] for i in ids), "decoding": "greedy",
            "memory": "hf: fresh process per model, peak = VmHWM; vllm: server process tree, sampled"
            if self.memory else "off",
        }


def _role(key: str) -> str:
    return key.split("/", 1)[1]


def _compares_itself(path: Path) -> bool:
    """True when the recipe file ``path`` has a benchmark stage whose ``compare`` names ``path`` itself."""
    from ..errors import LLMCompressError
    from ..utils.io import read_yaml

    try:
        raw = read_yaml(path)
    except LLMCompressError:
        return False  # its own errors are reported when it is loaded
    stages = raw.get("stages") if isinstance(raw, dict) else None
    for stage in stages if isinstance(stages, list) else []:
        compare = stage.get("compare") if isinstance(stage, dict) else None
        for entry in compare if isinstance(compare, list) else []:
            other = Path(str(entry)).expanduser()
            if (other if other.is_absolute() else path.parent / other).resolve() == path.resolve():
                return True
    return False


def _resolve_compare(ctx: "RunContext", entry: str, where: str) -> tuple[str, Path]:
    """``(name, model folder)`` of a ``compare`` entry: a recipe file is run (or resumed) into runs/<name> first."""
    from ..errors import LLMCompressError
    from ..runs import final_model, model_of

    path = ctx.recipe.resolve_path(entry)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise LLMCompressError(f"{where}: recipe file `{path}` does not exist. Fix: correct the path "
                                   "(relative to this recipe's folder).")
        from ..pipeline import run_recipe
        from ..recipe import load_recipe

        other = load_recipe(path)
        run_dir = Path("runs") / other.name
        ctx.log(f"benchmark: running (or resuming) {path} into {run_dir} for `compare`")
        run_recipe(other, run_dir, console=ctx.console, show_progress=False)
        model = final_model(run_dir)
        if model is None:
            raise LLMCompressError(f"{where}: recipe `{path}` produced no model. Fix: compare a recipe with a "
                                   "quantize, prune, lora or export stage.")
        return other.name, model
    model = model_of(path, where)
    if (path / "manifest.json").is_file():  # a run folder: its name
        name = path.name
    elif (model.parent.parent / "manifest.json").is_file():  # <run>/<NN-stage>/model: the run's name
        name = model.parent.parent.name
    else:  # a plain model folder: its own name
        name = model.name
    return name or model.name, model


def _cross(per_repeat: dict, backends: list[str], roles: list[str]) -> dict[str, dict[str, float]]:
    """Paired per-round medians across backends: ``{"vllm/compressed vs hf/original": {figure: x}}``.

    Throughput figures only (higher is better): each backend over the first for the same model, and every model
    under every other backend over the original under the first backend (the speedup a user gets by switching).
    """
    first = backends[0]
    out = {}
    pairs = [(f"{b}/{r}", f"{first}/{r}") for b in backends[1:] for r in roles]
    pairs += [(f"{b}/{r}", f"{first}/original") for b in backends[1:] for r in roles if r != "original"]
    for new, old in pairs:
        if new not in per_repeat or old not in per_repeat:
            continue
        paired = _paired(per_repeat[old], per_repeat[new])
        figs = {k: round(statistics.median(v), 4) for k, v in paired.items()
                if v and None not in v and ("tok_s" in k or k.startswith("requests_per_s"))}
        if figs:
            out[f"{new} vs {old}"] = figs
    return out


def _serving_summary(data: dict) -> dict[str, str]:
    """Summary lines for the backends beyond the first: throughput at the largest batch and the cross ratios."""
    out = {}
    bs = data["settings"]["batch_sizes"][-1]
    key = f"output_tok_s_bs{bs}"
    for name, res in list(data["backends"].items())[1:]:
        for role, figs in res["figures"].items():
            if key in figs:
                out[f"{name} {role} output bs{bs}"] = f"{figs[key]:.1f} tok/s"
        for role, why in res["unsupported"].items():
            out[f"{name} {role}"] = "not served here: " + re.sub(r"^`[^`]*` ", "", why).split(";")[0][:70]
    for pair, figs in data["cross"].items():
        if key in figs:
            out[f"{pair} (output bs{bs})"] = f"{figs[key]:.2f}x"
    return out


def _load_summary(load: dict | None) -> dict[str, str]:
    """One line per model: TTFT p99 and goodput (or request throughput) at the highest request rate."""
    if not load:
        return {}
    out = {}
    for key, points in load["curves"].items():
        last = points[-1]
        good = last.get("request_goodput")
        out[f"load {key} @ rate {last['rate']}"] = (
            f"TTFT p50/p99 {last['ttft_p50_ms']:.0f}/{last['ttft_p99_ms']:.0f} ms, "
            + (f"goodput {good:.2f} req/s" if good is not None else f"{last['request_throughput']:.2f} req/s"))
    return out


def _per_repeat(calls: list[dict], key: str, batch_sizes: list[int]) -> dict[str, list[float]]:
    """Timed figures of one (backend, model), one value per round (in round order)."""
    out: dict[str, list[float]] = {}
    small, large = batch_sizes[0], batch_sizes[-1]

    def add(name: str, value: float) -> None:
        out.setdefault(name, []).append(round(value, 4))

    for c in calls:
        if c["phase"] != "timed" or c["role"] != key:
            continue
        bs = c["batch_size"]
        if bs == small:
            add("ttft_ms", 1000 * c["ttft_s"])
            add("prefill_tok_s", c["prefill_tok_s"])
            add(f"decode_ms_per_token_bs{bs}", 1000 * c["decode_s"] / (c["new_tokens"] - 1))
        add(f"decode_tok_s_bs{bs}", c["decode_tok_s"])
        add(f"output_tok_s_bs{bs}", c["output_tok_s"])
        add(f"requests_per_s_bs{bs}", c["requests_s"])
        if bs == large:
            for q in ("ttft_p50", "ttft_p95", "itl_p50", "itl_p95"):
                add(f"{q}_ms_bs{bs}", 1000 * c[f"{q}_s"])
    return out


def _ratio(new: float | None, old: float | None) -> float | None:
    return round(new / old, 4) if old and new is not None else None


def _paired(old: dict[str, list[float]], new: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """new / old per round: the two calls of a pair ran back to back, so slow drift of the machine cancels."""
    return {k: [_ratio(b, a) for a, b in zip(old[k], new[k])] for k in old if k in new}


_UNITS = [  # figure prefix -> (summary label, unit, scale, digits)
    ("size_bytes", "size", "MiB", 2**-20, 1),
    ("peak_rss_bytes", "peak RSS", "MiB", 2**-20, 0),
    ("peak_rss_model_bytes", "peak RSS (model)", "MiB", 2**-20, 0),
    ("peak_gpu_bytes", "peak GPU", "MiB", 2**-20, 0),
    ("load_s", "load", "s", 1, 2),
    ("ttft_ms", "TTFT", "ms", 1, 0),
    ("prefill_tok_s", "prefill", "tok/s", 1, 1),
    ("decode_tok_s_bs", "decode bs", "tok/s", 1, 1),
]


def summarize(orig: dict, comp: dict, ratios: dict[str, float | None], same: bool, units: list = _UNITS,
              ) -> dict[str, str]:
    """Short lines like ``"decode bs1": "41.2 -> 55.0 tok/s (1.33x)"``; the ratio is ``ratios[figure]``."""
    out = {}
    for key, value in orig.items():
        for prefix, label, unit, scale, digits in units:
            if key == prefix or (prefix.endswith("_bs") and key.startswith(prefix)):
                name = label + key[len(prefix):] if prefix.endswith("_bs") else label
                a = f"{value * scale:.{digits}f}"
                if same:
                    out[name] = f"{a} {unit}"
                elif comp.get(key) is None:  # measured for the original only (e.g. a GGUF file has no hf size)
                    out[name] = f"{a} -> not measured {unit}"
                else:
                    ratio = "n/a" if ratios.get(key) is None else f"{ratios[key]:.2f}x"
                    out[name] = f"{a} -> {comp[key] * scale:.{digits}f} {unit} ({ratio})"
    return out


def vllm_overrides(cfg: VLLMConfig, device: str, n_servers: int) -> dict:
    """Server settings of the benchmark's vLLM engines: no prefix cache (the rounds repeat their prompts), and on a
    GPU the default memory share split between the servers that run at once (each would take 0.85 and the second
    would not start); a share the recipe sets is kept."""
    out = {"prefix_caching": False, **cfg.overrides()}
    if device.startswith("cuda") and n_servers > 1 and "gpu_memory_utilization" not in cfg.model_fields_set:
        out["gpu_memory_utilization"] = round(cfg.gpu_memory_utilization / n_servers, 3)
    return out
