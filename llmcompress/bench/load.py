"""Load curves of served models: vLLM's own ``vllm bench serve`` at each request rate, against the run's servers.

The benchmark stage's paired timer sends batches of B requests at once; a server in production sees requests arrive
over time. For each request rate (Poisson arrivals, or all at once for ``inf``) ``vllm bench serve`` sends
``num_prompts`` random prompts of ``input_len`` tokens, each asking for exactly ``output_len`` tokens (greedy,
``ignore_eos``), to the vLLM server the stage already runs for each model, and writes its result JSON; the figures
here are read from that JSON as the tool wrote it. Rates go up one by one, and at each rate every model takes its
turn (original, compressed, ...), so load on a shared machine hits all alike. The tool runs in vLLM's environment
(``serving/bench_serve_entry.py``), imported once for the whole sweep.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import LLMCompressError

if TYPE_CHECKING:
    from ..backends.served import ServedBackend

ENTRY = Path(__file__).resolve().parents[1] / "serving" / "bench_serve_entry.py"
#: What the tool's result JSON holds per metric and percentile (``p50_ttft_ms``, ...), kept as ``ttft_p50_ms``.
METRICS, PERCENTILES = ("ttft", "tpot", "itl", "e2el"), (50, 90, 99)
#: The backends a load curve runs on (``vllm bench serve --backend``), by the benchmark stage's backend name.
TOOL_BACKEND = {"vllm": "vllm"}


class SLOConfig(BaseModel):
    """The service-level objective goodput counts against: a request is good when it meets every limit given."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ttft_ms: float | None = Field(None, gt=0, description="Most time to first token (ms) a good request may take.")
    tpot_ms: float | None = Field(None, gt=0, description="Most time per output token after the first (ms).")
    e2el_ms: float | None = Field(None, gt=0, description="Most end-to-end latency (ms).")

    @model_validator(mode="after")
    def _one_limit(self) -> "SLOConfig":
        if self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None:
            raise ValueError("give at least one limit, e.g. {ttft_ms: 1000, tpot_ms: 100}, or remove `slo:`")
        return self

    def args(self) -> list[str]:
        """``--goodput ttft:MS tpot:MS`` as ``vllm bench serve`` takes it."""
        pairs = [f"{k[:-3]}:{v:g}" for k, v in self.model_dump().items() if v is not None]
        return ["--goodput", *pairs]


class LoadConfig(BaseModel):
    """A load sweep per served model (``vllm bench serve`` once per rate and model).

    ```yaml
    load: {rates: [1, 2, 4, inf], num_prompts: 32, input_len: 64, output_len: 64, slo: {ttft_ms: 1000, tpot_ms: 100}}
    ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rates: list[float | Literal["inf"]] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, "inf"], description="Request rates (requests/s, Poisson arrivals); "
        "`inf` sends every request at once. Sorted, `inf` last.")
    num_prompts: int = Field(32, ge=1, le=100_000, description="Requests sent at each rate, per model.")
    input_len: int = Field(64, ge=1, le=131_072, description="Prompt tokens per request (random token ids).")
    output_len: int = Field(64, ge=2, le=32_768, description="Tokens generated per request (greedy, ignore_eos); "
                            ">= 2, so that time per output token and inter-token latency exist.")
    max_concurrency: int | None = Field(None, ge=1, description="Most requests in flight at once (None: no limit).")
    burstiness: float = Field(1.0, gt=0, description="Gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier.")
    slo: SLOConfig | None = Field(None, description="Limits that define goodput (good requests/s); None: no goodput.")
    timeout_s: float = Field(3600, gt=0, description="Most seconds the whole sweep may take (all rates and models).")

    @field_validator("rates", mode="before")
    @classmethod
    def _inf_spellings(cls, v: Any) -> Any:
        """YAML's ``.inf`` and the strings inf / infinity all mean "every request at once"."""
        if not isinstance(v, list):
            return v
        out = []
        for r in v:
            if isinstance(r, str) and r.strip().lower() in ("inf", ".inf", "infinity"):
                r = "inf"
            elif isinstance(r, float) and math.isinf(r) and r > 0:
                r = "inf"
            out.append(r)
        return out

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list) -> list:
        if not v:
            raise ValueError("needs at least one request rate, e.g. [1, 2, 4, inf]")
        if any(r != "inf" and r <= 0 for r in v):
            raise ValueError(f"request rates must be > 0 (requests per second) or inf, got {v}")
        if len({str(r) for r in v}) != len(v):
            raise ValueError(f"request rates must be distinct, got {v}")
        return sorted(v, key=lambda r: math.inf if r == "inf" else r)


def rate_label(rate: float | str) -> str:
    return "inf" if rate == "inf" else f"{float(rate):g}"


def tool_args(cfg: LoadConfig, backend: "ServedBackend", rate: float | str, seed: int, result: Path) -> list[str]:
    """The ``vllm bench serve`` arguments of one run against ``backend``'s server."""
    args = ["--backend", TOOL_BACKEND.get(backend.name, "openai"), "--base-url", backend.server.url,
            "--model", backend.model_name, "--tokenizer", str(backend.tokenizer_dir),
            "--dataset-name", "random", "--random-input-len", str(cfg.input_len),
            "--random-output-len", str(cfg.output_len), "--num-prompts", str(cfg.num_prompts),
            "--request-rate", rate_label(rate), "--burstiness", f"{cfg.burstiness:g}", "--seed", str(seed),
            "--temperature", "0", "--ignore-eos", "--percentile-metrics", ",".join(METRICS),
            "--metric-percentiles", ",".join(map(str, PERCENTILES)), "--disable-tqdm",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    if cfg.max_concurrency:
        args += ["--max-concurrency", str(cfg.max_concurrency)]
    return args + (cfg.slo.args() if cfg.slo else [])


def figures(result: dict, slo: bool) -> dict[str, Any]:
    """The figures of one run, from the tool's result JSON (latencies in ms, as the tool writes them)."""
    out: dict[str, Any] = {
        "completed": result.get("completed"), "failed": result.get("failed"),
        "duration_s": _round(result.get("duration")),
        "request_throughput": _round(result.get("request_throughput")),
        "output_throughput": _round(result.get("output_throughput")),
        "total_token_throughput": _round(result.get("total_token_throughput")),
        "max_concurrent_requests": result.get("max_concurrent_requests"),
    }
    if slo:
        out["request_goodput"] = _round(result.get("request_goodput"))
    for m in METRICS:
        out[f"{m}_mean_ms"] = _round(result.get(f"mean_{m}_ms"))
        for p in PERCENTILES:
            out[f"{m}_p{p}_ms"] = _round(result.get(f"p{p}_{m}_ms"))
    # The tool writes 0 for TPOT and ITL when every request's whole output reached the client in its first chunk (a
    # tiny model at rate inf): then nothing was timed per token, and 0 ms would read as infinitely fast.
    unmeasured = [m for m in ("tpot", "itl") if out[f"{m}_mean_ms"] == 0]
    for m in unmeasured:
        out.update({f"{m}_mean_ms": None, **{f"{m}_p{p}_ms": None for p in PERCENTILES}})
    if unmeasured:
        out["not_per_token"] = unmeasured
    return out


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


def run_load(cfg: LoadConfig, backends: dict[str, "ServedBackend"], out_dir: Path, log_path: Path, seed: int,
             env: dict[str, str], where: str, advance: Callable[..., None] = lambda *a, **k: None) -> dict:
    """Sweep every rate over every backend in ``backends`` (``{"vllm/original": backend, ...}``, servers started).

    Returns ``{"settings", "curves": {key: [{"rate", **figures}, ...]}, "files"}``; the tool's own JSON files stay in
    ``out_dir``. Raises LLMCompressError with the log's last lines when the tool fails.
    """
    from ..serving.runtime import vllm_python

    python = vllm_python(where)
    for b in backends.values():
        b.check(cfg.input_len, cfg.output_len, where=f"{where}: load")
    out_dir.mkdir(parents=True, exist_ok=True)
    order = [(rate, key) for rate in cfg.rates for key in backends]  # rate by rate, every model in turn
    plan = [(rate, key, out_dir / (f"{n:02d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key}-rate{rate_label(rate)}")
                                   + ".json")) for n, (rate, key) in enumerate(order)]
    for _, _, path in plan:  # a file left by an earlier, killed attempt must not count as this run's
        path.unlink(missing_ok=True)
    spec = out_dir / "spec.json"
    spec.write_text(json.dumps({"runs": [tool_args(cfg, backends[k], r, seed, p) for r, k, p in plan]}, indent=1))
    child_env = {**env, **_api_keys(backends)}
    _run_entry([python, str(ENTRY), str(spec)], child_env, log_path, [p for _, _, p in plan], cfg.timeout_s, where,
               advance)
    curves: dict[str, list[dict]] = {key: [] for key in backends}
    for rate, key, path in plan:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LLMCompressError(f"{where}: load: `vllm bench serve` left no readable result in {path} ({e}). "
                                   f"Fix: read its log in {log_path}.") from None
        curves[key].append({"rate": rate, **figures(result, cfg.slo is not None)})
    version = next((b.version() for b in backends.values() if hasattr(b, "version")), None)
    settings = {"tool": f"vllm bench serve (vllm {version or '?'})", "dataset": "random", **cfg.model_dump(),
                "seed": seed, "temperature": 0, "ignore_eos": True, "order": "rate by rate, every model in turn",
                "arrivals": "all at once" if cfg.rates == ["inf"] else
                ("Poisson" if cfg.burstiness == 1 else f"gamma, burstiness {cfg.burstiness:g}")}
    return {"settings": settings, "curves": curves,
            "files": [p.relative_to(out_dir.parent).as_posix() for _, _, p in plan]}


def _api_keys(backends: dict[str, "ServedBackend"]) -> dict[str, str]:
    """The servers' API key as ``OPENAI_API_KEY`` (what the tool sends as a bearer token), never on a command line."""
    keys = {b.server.options.api_key for b in backends.values() if b.server.options.api_key}
    if len(keys) > 1:
        raise LLMCompressError("load: the servers have different API keys; the tool sends one. Fix: give every "
                               "server the same key.")
    return {"OPENAI_API_KEY": keys.pop()} if keys else {}


def _run_entry(cmd: list[str], env: dict[str, str], log_path: Path, results: list[Path], timeout_s: float,
               where: str, advance: Callable[..., None]) -> None:
    """Run the entry script in its own session (nothing outlives it), advancing once per result file written."""
    from ..utils.proc import die_with_parent

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
        done, deadline = 0, time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise LLMCompressError(f"{where}: load: `vllm bench serve` ran over {timeout_s:.0f} s. Fix: "
                                           "fewer `rates` or `num_prompts`, a larger `timeout_s`, or read "
                                           f"{log_path}.")
                time.sleep(0.5)
                now = sum(p.is_file() for p in results)
                if now > done:
                    advance(now - done, description=f"load: {now} of {len(results)} runs of vllm bench serve")
                    done = now
        finally:  # a timeout, an error or Ctrl-C: the tool's process group goes with it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    advance(len(results) - done)
    if proc.returncode != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        tail = "\n".join([ln for ln in lines if "Error" in ln][-6:] or lines[-8:])
        raise LLMCompressError(f"{where}: load: `vllm bench serve` failed (exit {proc.returncode}):\n{tail}\n"
                               f"Fix: read the whole log in {log_path}.")
