"""GPTQ through gptqmodel: weight-only int quantization that corrects each column's rounding error on calibration data.

    - {type: quantize, method: gptq, bits: 4, group_size: 64}

Layer by layer, GPTQ runs the calibration windows through the model, collects each linear layer's input Hessian
``H = X Xᵀ`` and rounds the weights one column at a time, pushing each column's rounding error onto the columns not
yet rounded (weighted by ``H⁻¹``). Round-to-nearest (`rtn`) rounds every weight alone; at the same bits and group size
GPTQ leaves a smaller error in the layer *outputs* on text like the calibration text.

The output is a standard GPTQ checkpoint (``quant_method: gptq``, format ``gptq``): ``AutoModelForCausalLM
.from_pretrained`` loads it (with ``gptqmodel`` and ``optimum`` installed); gptqmodel and vLLM read the same format
(vLLM untested here).
On CPU it quantizes in float32 (the bf16 gptqmodel picks by itself ran ~4x slower on an AVX2-only CPU); weights
that stay dense (embeddings, norms, skipped layers) are saved in the source's dtype (bf16 for SmolLM2). The first
quantization on a machine compiles gptqmodel's packing kernel (~50 s, cached in ``~/.cache/gptqmodel``).
gptqmodel's output (banners, progress, per-layer tables) goes to ``<stage folder>/gptqmodel.log``, its per-module
losses to ``<stage folder>/gptq_log_*.log`` and ``model/quant_log.csv``.
"""

from __future__ import annotations

import io
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field, field_validator

from ..data.calibration import CalibrationConfig, check_calibration, load_calibration, to_records
from ..errors import LLMCompressError, RecipeError, require
from ..stage import StageResult
from ..utils.memory import heap_returned
from .base import QuantizeConfig, check_group_size
from .plan import meta_model, plan_layers

if TYPE_CHECKING:
    import torch

    from ..context import RunContext

LOG_FILE = "gptqmodel.log"
#: gptqmodel 7.6 refuses fewer than 2 CPU workers ("Virtual pool 'model_loader:cpu' requests 2 workers but parent
#: 'cpu' only has 1"); each worker runs torch ops with the run's torch thread count.
_MIN_CPU_WORKERS = 2


class GPTQConfig(QuantizeConfig):
    """GPTQ via gptqmodel, calibrated: ``{type: quantize, method: gptq, bits: 4, group_size: 64}``."""

    method: Literal["gptq"] = "gptq"
    bits: int = Field(4, description="Bits per weight: 2, 3, 4 or 8.")
    group_size: int = Field(
        64, description="Weights sharing one scale; must divide every quantized layer's input width (576 for "
        "SmolLM2: 64 works, 128 does not); -1 = one scale per output row.",
    )
    desc_act: bool = Field(
        False, description="act-order: round columns in order of decreasing activation size (off: gptqmodel's "
        "group-aware reordering, which keeps groups contiguous and the kernels fast).",
    )
    sym: bool = Field(
        False, description="Symmetric (no zero point). Off: a zero point per group fits skewed weights better "
        "(SmolLM2 W4 g64: perplexity 14.6 vs 14.9 on Python docs, 49.0 vs 52.7 on Shakespeare); on: the form vLLM's "
        "fast GPU kernels (Marlin) need.",
    )
    damp_percent: float = Field(
        0.05, gt=0, lt=1, description="Dampening added to H's diagonal, as a fraction of its mean."
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text the model sees while quantizing (16 x 256 tokens).",
    )

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in (2, 3, 4, 8):
            raise ValueError("must be 2, 3, 4 or 8 (the widths GPTQ kernels pack)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return check_group_size(v)

    def preflight(self, base_dir: Path | None = None) -> None:
        """Extras installed; the calibration file exists (when its folder is known) or the hub is reachable."""
        require("gptqmodel", "gptq", "Method `gptq`")
        require("optimum", "gptq", "Method `gptq` (transformers loads GPTQ checkpoints through optimum)")
        check_calibration(self.calibration, base_dir)

    def run(self, ctx: "RunContext") -> StageResult:
        # Not QuantizeConfig.run: gptqmodel saves its own checkpoint layout, and later stages must see the model as
        # transformers loads that folder, not gptqmodel's in-memory wrapper.
        from ..models.loading import param_bytes

        self.preflight(ctx.recipe.base_dir)
        t0 = time.perf_counter()
        with ctx.task(f"quantize {self.method}", total=None), ctx.new_model_dir() as tmp:
            info = _quantize_gptq(self, ctx, tmp)
        seconds = time.perf_counter() - t0
        ctx.set_current(ctx.stage_dir / "model")
        with ctx.task("load quantized model"), _gptqmodel_output(ctx.stage_dir / LOG_FILE):
            model, _ = ctx.current.load()  # as every later stage and user sees it: plain transformers
        data = {
            "method": self.method,
            "bits": self.bits_per_weight(),
            "quantize_seconds": round(info.pop("quantize_seconds"), 3),
            "stage_seconds": round(seconds, 3),
            "param_bytes": param_bytes(model),
            "size_bytes": ctx.current.size_bytes,
            **info,
        }
        summary = {"method": self.method, "time": f"{data['quantize_seconds']:.1f}s",
                   "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
        return StageResult(type="quantize", label=self.label, model_dir="model", data=data, summary=summary)


# ---------------------------------------------------------------------------------------------------------------------
# Implementation


def _quantize_gptq(cfg: GPTQConfig, ctx: "RunContext", out: Path) -> dict[str, Any]:
    """Quantize ``ctx.current`` into the folder ``out``; return the figures for the stage result."""
    import torch
    from transformers import AutoTokenizer

    source = ctx.current
    cfg.ensure_dense(source)
    plan = _plan(cfg, source.path)  # checks group size, skips and seq_len before any weights load
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    calibration = load_calibration(cfg.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)  # (N, L)

    on_cpu = ctx.runtime.device == "cpu"
    workers = max(_MIN_CPU_WORKERS, ctx.runtime.threads) if on_cpu else None
    compute_dtype = torch.float32 if on_cpu else getattr(torch, ctx.runtime.dtype)
    offload = ctx.stage_dir / "gptqmodel-offload"
    # heap_returned: gptqmodel's worker threads allocate and free a layer's tensors over and over; in glibc's
    # per-thread heaps the freed memory stayed resident (360M model: 1.19 GiB at the end of the loop, 0.66 inside).
    with _gptqmodel_output(ctx.stage_dir / LOG_FILE), _cpu_workers(workers), _removed_after(offload), \
            heap_returned():
        t0 = time.perf_counter()
        GPTQModel, QuantizeConfig = _import_gptqmodel()  # ~10 s the first time in a process
        t1 = time.perf_counter()
        qcfg = QuantizeConfig(
            bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym,
            damp_percent=cfg.damp_percent, lm_head=False,
            # One pass per decoder layer instead of one per sub-layer group (q/k/v, o, gate/up, down): on SmolLM2
            # W4 g64 sym, 16 x 256 tokens, the sequential passes took 116 s vs 94 s for no gain (perplexity 15.05 vs
            # 14.87 on Python docs, 53.9 vs 52.7 on Shakespeare).
            true_sequential=False,
            dynamic={f"-:^{re.escape(name)}$": {} for name in plan["skipped"]} or None,
            offload_to_disk_path=str(offload),  # in the stage folder, so even a killed run leaves nothing elsewhere
        )
        qmodel = GPTQModel.load(str(source.path), qcfg, device=ctx.runtime.device, dtype=compute_dtype)
        with _gptqmodel_log_dir(ctx.stage_dir):
            qmodel.quantize(to_records(calibration), batch_size=1)
        seconds = time.perf_counter() - t1  # load + calibrate + quantize + pack, as `rtn` counts load + round
        qmodel.save(str(out))
        del qmodel  # before the folder is rewritten and reloaded; heap_returned's exit collects it
    _cast_dense_files_(out, plan["storage_dtype"])
    _finish_folder(out, plan, tokenizer)
    _write_meta(cfg, ctx, out, plan, calibration.shape)
    return {
        "quantize_seconds": seconds,
        "import_seconds": round(t1 - t0, 3),
        "quantized_modules": len(plan["quantized"]),
        "skipped_modules": plan["skipped"] + [plan["lm_head"]],
        "calibration": cfg.calibration.record(calibration),
        "compute": {"device": ctx.runtime.device, "dtype": str(compute_dtype).removeprefix("torch."),
                    "threads": ctx.runtime.threads, "gptqmodel_cpu_workers": workers},
        "log": f"{ctx.stage_dir.name}/{LOG_FILE}",
    }


def _plan(cfg: GPTQConfig, path: Path) -> dict[str, Any]:
    """Which linear layers get quantized and which stay dense, from the config alone (an empty meta-device model)."""
    config, model = meta_model(path)
    head = model.get_output_embeddings()
    lm_head = next((n for n, m in model.named_modules() if m is head), "lm_head")
    if not cfg.skips(lm_head):
        raise RecipeError(
            f"gptq keeps `{lm_head}` dense: transformers' GPTQ loader only converts layers inside the decoder blocks, "
            f"so a quantized `{lm_head}` would not load. Fix: keep `{lm_head}` in `skip`."
        )
    plan = plan_layers(cfg.skips, config, model, cfg.group_size, cfg.calibration.seq_len, exclude=(lm_head,))
    quantized, skipped = plan["quantized"], plan["skipped"]
    # Dense weights are saved as the source stores them (bf16 for SmolLM2), whatever dtype the run computes in.
    storage = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    storage = storage if storage in ("bfloat16", "float16", "float32") else "float32"
    return {"quantized": quantized, "skipped": skipped, "lm_head": lm_head, "storage_dtype": storage}


def _import_gptqmodel():
    """Import gptqmodel, undoing the environment changes its import makes (its dependency `tokenicer` points
    HF_HOME at /tmp/tokenicer_hf_home, which every later subprocess would inherit)."""
    from ..utils.envguard import environ_kept, import_tokenicer_cleanly

    import_tokenicer_cleanly()
    with environ_kept():  # gptqmodel itself sets PYTORCH_ALLOC_CONF, KMP_*, CUDA_DEVICE_ORDER ...
        from gptqmodel import GPTQModel, QuantizeConfig
    return GPTQModel, QuantizeConfig


@contextmanager
def _gptqmodel_log_dir(path: Path) -> Iterator[None]:
    """gptqmodel 7.6 writes a per-layer log into ``./logs/`` of the working directory (a module constant): point it
    into the stage folder instead of littering the user's folder (or repository)."""
    from gptqmodel.looper import loop_processor

    old = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = Path(path).resolve()
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = old


@contextmanager
def _removed_after(path: Path) -> Iterator[None]:
    import shutil

    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _cpu_workers(threads: int | None) -> Iterator[None]:
    """gptqmodel's CPU thread pool size (read once, when the pool is first built): the run's thread count (at least
    2, see _MIN_CPU_WORKERS) instead of its default of half the cores, up to 12."""
    old = os.environ.get("GPTQMODEL_CPU_WORKERS")
    if threads is not None:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(threads)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GPTQMODEL_CPU_WORKERS", None)
        else:
            os.environ["GPTQMODEL_CPU_WORKERS"] = old


@contextmanager
def _gptqmodel_output(log: Path) -> Iterator[None]:
    """Send what gptqmodel prints to stdout (hundreds of progress and table lines) to ``log``, so the run's own
    progress stays readable: Python-level writes (whatever ``sys.stdout`` is: a terminal, rich's progress proxy,
    pytest's capture) and native ones (fd 1). A failure names the log."""
    import logging
    import sys

    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    saved_fd, saved_stdout = os.dup(1), sys.stdout
    # Known-harmless stderr lines: tokenicer's INFO notes, torchao's "Failed to load ..._C_*.so" (CUDA-only kernels).
    quiet = {name: logging.getLogger(name).level for name in ("tokenicer", "torchao")}
    with open(log, "a", encoding="utf-8") as f:
        stream = _LogStream(f)
        os.dup2(f.fileno(), 1)
        sys.stdout = stream
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        except LLMCompressError:
            raise
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {e} (gptqmodel's output: {log})") from e
        finally:
            stream.flush()
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)
            sys.stdout = saved_stdout
            stream.release()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


class _LogStream(io.StringIO):
    """``sys.stdout`` while gptqmodel runs. A StringIO subclass, so that logbar writes to it directly instead of
    through a background queue; if a library keeps a reference, later writes go to the real stdout, never to a
    closed file."""

    def __init__(self, file) -> None:
        super().__init__()
        self._file = file

    def write(self, s: str) -> int:
        import sys

        if self._file is not None:
            return self._file.write(s)
        return (sys.stdout if sys.stdout is not self else sys.__stdout__).write(s)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def isatty(self) -> bool:
        return False

    def release(self) -> None:
        self._file = None


def _cast_dense_files_(out: Path, dtype: str) -> None:
    """Cast the tensors gptqmodel saved dense (embeddings, norms, skipped layers) from the compute dtype back to the
    source's dtype: float32 copies of bf16 weights are exact but twice the size. Quantized layers are untouched.
    (Done on the files, a tensor at a time: before saving, gptqmodel holds some of these tensors lazily, on the meta
    device.)"""
    from ..models.loading import torch_dtype
    from ..utils.tensorfile import rewrite_safetensors, safetensors_dtype, safetensors_header

    target = torch_dtype(dtype)
    for f in sorted(out.glob("*.safetensors")):
        header = safetensors_header(f)[1]
        quantized = {k.rsplit(".", 1)[0] for k in header if k.endswith(".qweight")}

        def dtype_for(name: str, stored: "torch.dtype", quantized: set = quantized) -> "torch.dtype":
            dense = name.rsplit(".", 1)[0] not in quantized and stored.is_floating_point
            return target if dense else stored

        if any(dtype_for(k, safetensors_dtype(v["dtype"])) != safetensors_dtype(v["dtype"])
               for k, v in header.items() if k != "__metadata__"):
            rewrite_safetensors(f, f, dtype_for)


def _finish_folder(out: Path, plan: dict, tokenizer) -> None:
    """Make the folder load right everywhere: skipped layers listed for transformers/optimum (which ignore
    gptqmodel's `dynamic` skips), the stored dtype in config.json, and the source's tokenizer."""
    import json

    from ..utils.io import atomic_write_json

    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    qc = config["quantization_config"]
    if plan["skipped"]:
        # optimum keeps a block layer quantized when its full name ends with an entry: full names = exact matches.
        qc["modules_in_block_to_quantize"] = [plan["quantized"]]
    qc.get("meta", {}).pop("offload_to_disk_path", None)  # a temporary folder of this run, gone now
    config["dtype"] = plan["storage_dtype"]
    atomic_write_json(cfg_path, config)
    qfile = out / "quantize_config.json"
    if qfile.is_file():
        q = json.loads(qfile.read_text())
        q.get("meta", {}).pop("offload_to_disk_path", None)
        atomic_write_json(qfile, q)
    tokenizer.save_pretrained(out)


def _write_meta(cfg: GPTQConfig, ctx: "RunContext", out: Path, plan: dict, calib_shape) -> None:

    from ..models.loading import META, versions
    from ..utils.io import atomic_write_json

    meta = {
        "format": "hf",
        "method": cfg.method,
        "config": cfg.model_dump(mode="json"),
        "source": ctx.original.describe(),
        "gptq": {"bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act, "sym": cfg.sym,
                 "quantized_modules": len(plan["quantized"]), "skipped_modules": plan["skipped"] + [plan["lm_head"]],
                 "calibration_windows": list(calib_shape)},
        "versions": versions(),
    }
    atomic_write_json(out / META, meta)
