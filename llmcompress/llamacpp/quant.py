"""GGUF k-quants and i-quants by llama.cpp's own tools, with an importance matrix from the stage's calibration text.

    - {type: quantize, method: gguf, gguf_type: Q4_K_M}                       # imatrix from builtin:pydoc
    - {type: quantize, method: gguf, gguf_type: IQ4_XS, imatrix: true}

``tensor_types`` sets single tensors' types as llama-quantize's ``--tensor-type`` does, e.g. ``attn_v: q8_0``.

Steps, all llama.cpp's (``llmcompress setup llamacpp`` builds them once): the dense model -> F16 GGUF
(``convert_hf_to_gguf.py``); the calibration windows, written as text, through ``llama-imatrix`` (the mean squared
activation of every weight column, which ``llama-quantize`` uses to weigh the rounding error of each column);
``llama-quantize --imatrix ... [--tensor-type PATTERN=TYPE ...] F16 -> <type>``. The stage folder keeps the
calibration text, the imatrix and every tool's log, so the file can be made again by hand. The model folder holds
``model.gguf`` plus the tokenizer and config.json, so our tokenizer and evaluation windows apply to it unchanged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..data.calibration import CalibrationConfig, check_calibration, load_calibration
from ..errors import LLMCompressError
from ..quant.base import QuantizeConfig
from ..registry import did_you_mean
from ..stage import StageResult
from . import runtime
from .plan import BLOCK, DEFAULT_TYPES

if TYPE_CHECKING:
    from ..context import RunContext

FILE = "model.gguf"
#: llama-quantize's file types (its QUANT_OPTIONS), with nominal bits per weight for reports.
GGUF_TYPES: dict[str, float] = {
    "Q2_K": 2.96, "Q2_K_S": 2.96, "Q3_K_S": 3.41, "Q3_K_M": 3.74, "Q3_K_L": 4.03, "Q4_0": 4.34, "Q4_1": 4.78,
    "Q4_K_S": 4.37, "Q4_K_M": 4.58, "Q5_0": 5.21, "Q5_1": 5.65, "Q5_K_S": 5.21, "Q5_K_M": 5.33, "Q6_K": 6.14,
    "Q8_0": 7.96, "IQ1_S": 1.56, "IQ1_M": 1.75, "IQ2_XXS": 2.06, "IQ2_XS": 2.31, "IQ2_S": 2.5, "IQ2_M": 2.7,
    "IQ3_XXS": 3.06, "IQ3_XS": 3.3, "IQ3_S": 3.44, "IQ3_M": 3.66, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "TQ1_0": 1.69,
    "TQ2_0": 2.06, "F16": 16, "BF16": 16,
}
#: Types llama-quantize refuses to make without an importance matrix.
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S")
#: ggml tensor types ``tensor_types`` may name (llama-quantize's --tensor-type values).
TENSOR_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m", "iq4_nl", "iq4_xs", "tq1_0",
                "tq2_0")


def check_gguf_type(v: str, choices=GGUF_TYPES) -> str:
    """A llama-quantize type name (case-insensitive); ValueError with did-you-mean and the choices."""
    name = str(v).upper()
    if name not in choices:
        raise ValueError(f"unknown GGUF type `{v}`.{did_you_mean(name, list(choices))} "
                         f"Choices: {', '.join(choices)}")
    return name


class GGUFConfig(QuantizeConfig):
    """GGUF by llama.cpp (see the module docstring): ``{type: quantize, method: gguf, gguf_type: Q4_K_M}``."""

    method: Literal["gguf"] = "gguf"
    gguf_type: str = Field("Q4_K_M", description="llama-quantize type: Q2_K..Q6_K, Q4_K_S/M, Q5_K_M, IQ4_XS, Q4_0, "
                           "Q8_0, ... (case-insensitive).")
    imatrix: bool = Field(True, description="Weigh rounding errors by an importance matrix from `calibration` "
                          "(llama-imatrix). Needed by IQ1/IQ2 types.")
    calibration: CalibrationConfig = Field(
        default_factory=lambda: CalibrationConfig(samples=64, seq_len=512),
        description="Text llama-imatrix runs (64 x 512 tokens; each window is one llama.cpp chunk).")
    tensor_types: dict[str, str] = Field(
        default_factory=dict, description="Per-tensor types, as llama-quantize's --tensor-type: a regex on GGUF "
        "tensor names (blk.N.attn_v.weight, token_embd.weight, ...) -> a ggml type (q8_0, q6_k, f16, ...).")
    target_bits: float | None = Field(
        None, gt=1, le=16, description="Mixed precision under a bit budget: bits per weight over every quantized "
        "matrix (token embedding included). Each tensor's type is chosen among `plan_types` by its measured "
        "sensitivity (llama.cpp's own rounding error weighted by the Fisher information on the calibration windows); "
        "see llmcompress/llamacpp/plan.py. null: llama-quantize's fixed mixture for `gguf_type`.")
    plan_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TYPES), description="Candidate ggml types for `target_bits` "
        f"(any of {', '.join(BLOCK)}); k-quants apply to tensors whose rows are a multiple of 256.")
    plan_samples: int = Field(16, ge=1, description="Calibration windows the sensitivity (Fisher) is measured on "
                              "(the first N of `calibration`).")
    skip: list[str] = Field(default_factory=list, description="Not used by gguf: keep tensors at a higher type with "
                            "`tensor_types` (e.g. {\"attn_v\": q8_0}).")

    nominal_bits: ClassVar[float] = 4.58

    @field_validator("gguf_type")
    @classmethod
    def _type(cls, v: str) -> str:
        return check_gguf_type(v)

    @field_validator("tensor_types")
    @classmethod
    def _tensor_types(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for pattern, kind in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"tensor_types: `{pattern}` is not a regular expression ({e})") from None
            if "=" in pattern:
                raise ValueError(f"tensor_types: `{pattern}` may not hold `=` (llama-quantize splits on it)")
            kind = str(kind).lower()
            if kind not in TENSOR_TYPES:
                raise ValueError(f"tensor_types[{pattern!r}]: unknown ggml type `{kind}`."
                                 f"{did_you_mean(kind, list(TENSOR_TYPES))} Choices: {', '.join(TENSOR_TYPES)}")
            out[pattern] = kind
        return out

    @field_validator("plan_types")
    @classmethod
    def _plan_types(cls, v: list[str]) -> list[str]:
        out = []
        for kind in v:
            kind = str(kind).lower()
            if kind not in BLOCK:
                raise ValueError(f"plan_types: `{kind}` is not a type the planner measures."
                                 f"{did_you_mean(kind, list(BLOCK))} Choices: {', '.join(BLOCK)}")
            if kind in out:
                raise ValueError(f"plan_types: `{kind}` is listed twice")
            out.append(kind)
        if not out:
            raise ValueError("plan_types is empty. Fix: list at least one type, e.g. [q4_k, q5_1, q8_0]")
        return out

    @field_validator("skip")
    @classmethod
    def _no_skip(cls, v: list[str]) -> list[str]:
        if v:
            raise ValueError("gguf does not skip layers; keep a tensor at a higher type with `tensor_types`, "
                             "e.g. {\"output\": q8_0}")
        return v

    @model_validator(mode="after")
    def _imatrix_needed(self) -> "GGUFConfig":
        if self.gguf_type in NEEDS_IMATRIX and not self.imatrix:
            raise ValueError(f"gguf_type {self.gguf_type} needs an importance matrix. Fix: set `imatrix: true`")
        if self.target_bits is None and (self.plan_types != list(DEFAULT_TYPES) or self.plan_samples != 16):
            raise ValueError("`plan_types` and `plan_samples` apply to `target_bits` only. Fix: set `target_bits`, "
                             "or remove them")
        if self.target_bits is not None and self.tensor_types:
            raise ValueError("`target_bits` chooses every tensor's type, so `tensor_types` would be overridden. "
                             "Fix: use one of them")
        if self.target_bits is not None and self.plan_samples > self.calibration.samples:
            raise ValueError(f"plan_samples ({self.plan_samples}) is more than calibration.samples "
                             f"({self.calibration.samples}). Fix: lower plan_samples or raise calibration.samples")
        return self

    def bits_per_weight(self) -> float:
        return self.target_bits if self.target_bits is not None else GGUF_TYPES[self.gguf_type]

    def preflight(self, base_dir: Path | None = None) -> None:
        """llama.cpp set up (and built for this CPU); the calibration file there."""
        runtime.require(f"method gguf ({self.gguf_type})")
        if self.imatrix:
            check_calibration(self.calibration, base_dir)

    def check_model(self, model_dir: Path) -> None:
        """The model's architecture is one llama.cpp's converter knows (read from its config.json)."""
        from .convert import check_convertible

        check_convertible(model_dir, "method gguf")

    def run(self, ctx: "RunContext") -> StageResult:
        from .convert import check_convertible

        self.preflight(ctx.recipe.base_dir)
        self.ensure_dense(ctx.current)
        check_convertible(ctx.current.path, f"{self.label}: method gguf")
        t0 = time.perf_counter()
        with ctx.task(f"quantize gguf {self.gguf_type}", total=None), ctx.new_model_dir() as tmp:
            info = _quantize(self, ctx, tmp)
        seconds = time.perf_counter() - t0
        ctx.set_current(ctx.stage_dir / "model")
        data = {"method": self.method, "gguf_type": self.gguf_type, "bits": self.bits_per_weight(),
                "quantize_seconds": round(seconds, 3), "size_bytes": ctx.current.size_bytes, **info}
        summary = {"method": f"gguf {self.gguf_type}" + (" + imatrix" if self.imatrix else ""),
                   "time": f"{seconds:.1f}s", "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
        return StageResult(type="quantize", label=self.label, model_dir="model", data=data, summary=summary)


# ---------------------------------------------------------------------------------------------------------------------


def _run_tool(cmd: list[str], log: Path, what: str) -> str:
    """Run a llama.cpp tool, its output into ``log``; LLMCompressError (with the log's tail) on failure."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-10:])
        raise LLMCompressError(f"{what}: `{Path(cmd[0]).name}` failed (exit {proc.returncode}):\n{tail}\n"
                               f"Fix: read the whole log in {log}.")
    return text


def _quantize(cfg: GGUFConfig, ctx: "RunContext", out: Path) -> dict[str, Any]:
    from ..models.loading import versions
    from ..utils.io import atomic_write_json
    from .convert import to_gguf

    from transformers import AutoTokenizer

    stage = ctx.stage_dir
    threads = str(ctx.runtime.threads)
    source = ctx.current.path
    tokenizer = AutoTokenizer.from_pretrained(str(source))  # for the calibration windows, then copied beside the GGUF
    f16 = stage / "model-f16.gguf"  # scaffolding: removed once the quantized file exists
    ctx.log(f"gguf: converting {source} to F16 with llama.cpp's convert_hf_to_gguf.py")
    cmd = [str(runtime.tool("llama-quantize", "method gguf"))]
    info: dict[str, Any] = {"llama_cpp": runtime.LLAMA_CPP_COMMIT}
    try:
        to_gguf(source, f16, "f16", log_path=stage / "convert.log")
        ids = None
        if cfg.imatrix or cfg.target_bits is not None:
            ids = load_calibration(cfg.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (n, len)
        if cfg.imatrix:
            imatrix, chunks = _imatrix(cfg, ctx, f16, ids, tokenizer, threads)
            cmd += ["--imatrix", str(imatrix)]
            info["imatrix"] = {"file": imatrix.name, "calibration": cfg.calibration.record(), "chunks": chunks,
                               "ctx": cfg.calibration.seq_len}
        for pattern, kind in cfg.tensor_types.items():
            cmd += ["--tensor-type", f"{pattern}={kind}"]
        if cfg.target_bits is not None:
            type_file, embedding, info["plan"] = _plan(cfg, ctx, f16, ids, cmd[1:], threads)
            cmd += ["--tensor-type-file", str(type_file)] + (["--token-embedding-type", embedding] if embedding else [])
        cmd += [str(f16), str(out / FILE), cfg.gguf_type, threads]
        ctx.log(f"gguf: llama-quantize -> {cfg.gguf_type}" + (" with the importance matrix" if cfg.imatrix else ""))
        text = _run_tool(cmd, stage / "quantize.log", f"{cfg.label}: llama-quantize")
    finally:
        f16.unlink(missing_ok=True)
    info["tensor_types"] = _type_counts(text)
    for name in ("config.json", "generation_config.json"):  # config: context length etc. for the evaluator
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    tokenizer.save_pretrained(out)
    meta = {"format": "gguf", "file": FILE, "method": "gguf", "gguf_type": cfg.gguf_type,
            "config": cfg.model_dump(mode="json"), "source": ctx.original.describe(),
            "imatrix": cfg.imatrix, "llama_cpp": runtime.LLAMA_CPP_COMMIT, "versions": versions()}
    atomic_write_json(out / "llmcompress.json", meta)
    from .check import check_file

    ctx.log("gguf: loading the file in a fresh llama.cpp process (logits vs the model it was made from)")
    model, _ = ctx.current.load()  # still the source: the stage switches to the GGUF after this
    info["reload"] = {**check_file(out / FILE, model, tokenizer, ctx.runtime.threads),
                      "reference": "the dense source model (transformers)"}
    return info


def _plan(cfg: GGUFConfig, ctx: "RunContext", f16: Path, ids: Any, imatrix_args: list[str], threads: str,
          ) -> tuple[Path, str | None, dict[str, Any]]:
    """The measured mixed-precision plan for ``target_bits`` (see plan.py): the tensor-type file, the embedding's
    type and a summary for the stage's result; plan.json keeps every candidate."""
    from . import plan

    t0 = time.perf_counter()
    weights = plan.weights_f32(f16)
    model, _ = ctx.current.load()
    windows = ids[: cfg.plan_samples]
    with ctx.task(f"gguf plan: sensitivity on {len(windows)} windows", total=len(windows)) as advance:
        fish = plan.fisher(model, windows, advance)
    source = {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters() if n in fish}
    fish = plan.map_fisher(fish, source, weights)
    del source

    def quantize(args: list[str], ftype: str, out: Path) -> None:
        _run_tool([str(runtime.tool("llama-quantize", "method gguf")), *imatrix_args, *args, str(f16), str(out),
                   ftype, threads], ctx.stage_dir / "plan-quantize.log", f"{cfg.label}: llama-quantize (plan)")

    table = plan.measure(cfg.plan_types, quantize, fish, weights, ctx.stage_dir, ctx.log)
    missing = [n for n, c in table.items() if not c]
    if missing:
        raise LLMCompressError(f"{cfg.label}: no type of `plan_types` fits {missing[0]} (and {len(missing) - 1} "
                               "more). Fix: add a block-32 type (q5_1, q8_0, ...) to `plan_types`.")
    n_params = sum(int(w.size) for w in weights.values())
    del fish, weights
    budget = cfg.target_bits * n_params / 8
    chosen = plan.allocate(table, budget, n_params)
    info = {**plan.summary(chosen, table, n_params), "target_bits": cfg.target_bits, "candidates": cfg.plan_types,
            "windows": len(windows), "seconds": round(time.perf_counter() - t0, 1), "file": "plan.json"}
    plan.save(ctx.stage_dir / "plan.json", chosen, table, info)
    type_file, embedding = plan.type_file(chosen, ctx.stage_dir / "tensor-types.txt")
    ctx.log(f"gguf plan: {info['bits_per_weight']} bits per weight ({info['seconds']}s): {info['types']}")
    return type_file, embedding, info


def _imatrix(cfg: GGUFConfig, ctx: "RunContext", f16: Path, ids: Any, tokenizer: Any, threads: str,
             ) -> tuple[Path, int]:
    """Write the calibration windows as text and run llama-imatrix over them, one window per chunk; return the
    imatrix file and the chunks it computed (re-tokenized text can come a few tokens short of the last chunk)."""
    text_file = ctx.stage_dir / "calibration.txt"
    # Decoded back to text, llama.cpp re-tokenizes it: the same tokenizer, so the same tokens but at window seams.
    text_file.write_text("".join(tokenizer.decode(row) for row in ids))
    imatrix = ctx.stage_dir / "imatrix.gguf"
    ctx.log(f"gguf: llama-imatrix on {ids.shape[0]} x {ids.shape[1]} calibration tokens")
    cmd = [str(runtime.tool("llama-imatrix", "method gguf")), "-m", str(f16), "-f", str(text_file), "-o",
           str(imatrix), "-c", str(cfg.calibration.seq_len), "--chunks", str(cfg.calibration.samples), "-t", threads,
           "-b", str(cfg.calibration.seq_len)]
    log = _run_tool(cmd, ctx.stage_dir / "imatrix.log", f"{cfg.label}: llama-imatrix")
    if not imatrix.is_file():
        raise LLMCompressError(f"{cfg.label}: llama-imatrix wrote no {imatrix.name}. Fix: read "
                               f"{ctx.stage_dir / 'imatrix.log'}.")
    found = re.findall(r"computing over (\d+) chunks", log)
    return imatrix, int(found[-1]) if found else cfg.calibration.samples


def _type_counts(log: str) -> dict[str, int]:
    """{ggml type: tensors} of the written file, from llama-quantize's per-tensor entries
    (``[  3/ 272] blk.0.attn_k.weight - [...], type =    f16, converting to q5_0 .. size = ...``; other log lines
    may come between an entry's parts)."""
    counts: dict[str, int] = {}
    for entry in re.split(r"^(?=\[\s*\d+/\s*\d+\] )", log, flags=re.M)[1:]:
        old = re.search(r"type =\s+(\w+)", entry)
        new = re.search(r"converting to (\w+)", entry)
        if old:
            kind = (new or old).group(1)
            counts[kind] = counts.get(kind, 0) + 1
    return counts
