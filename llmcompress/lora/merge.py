"""Merge modes: ``merge(inputs, target, ctx) -> info`` writes ``<target>/model`` (registered in ``lora/__init__``).

- ``keep``: ``model/`` = the adapter (peft files) + ``base/`` (the quantized base folder, hard-linked) + tokenizer;
  format ``peft`` in ``llmcompress.json``, which ``load_model`` loads as base + adapter (``load_peft``).
- ``requantize``: the adapter merged into the weights the quantize stage started from (``W + s·BA``; with
  ``requantize_from: dequantized``, into the dequantized base ``deq(Q) + s·BA``), then quantized again by that same
  stage config: an ordinary folder of that method, the adapter's cost gone. Measured on SmolLM2 NF4 + a distill
  adapter, it also loses the adapter's gain: a recovery adapter learns corrections of ``deq(Q)`` (``≈ W - deq(Q)``),
  which added to ``W`` overshoot, and added to ``deq(Q)`` are mostly below half a quantization step and round away.
- ``dequantized``: the quantized base dequantized into a dense copy, the adapter merged into it (``deq(Q) + s·BA``,
  exactly the unmerged function up to the storage dtype's rounding), saved in the original's storage dtype (bf16).

Every merge reads the quantized base fresh from its folder: bnb 4-bit layers repack their weights in place on the
first inference forward on CPUs with AVX512-BF16, and a merge that dequantized the repacked layout corrupted the
model (DESIGN.md); merging *into* bnb 4-bit in place is never done.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..context import weight_bytes
from ..errors import RecipeError
from ..utils.io import atomic_dir, atomic_write_json

if TYPE_CHECKING:
    from ..context import RunContext
    from .config import LoraSettings

PEFT_FORMAT = "peft"
BASE_DIR = "base"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class MergeInputs:
    """What every merge mode needs: the quantized base, the adapter, and the dense weights quantize started from."""

    base: Path  # the model the adapter was trained on (the current model before the lora stage)
    adapter: Path  # peft adapter folder
    source: Path  # dense weights the quantize stage started from (= base when nothing quantized it)
    quantize: Any  # that quantize stage's config, or None
    meta: dict  # lora metadata for llmcompress.json
    storage_dtype: str | None
    requantize_from: str = "original"  # requantize merges into: "original" (W) or "dequantized" (deq(Q)) weights

    @classmethod
    def from_context(cls, ctx: "RunContext", cfg: "LoraSettings", adapter: Path, meta: dict,
                     refit: Any = None) -> "MergeInputs":
        """``refit`` (lora.refit.Refit): the adapter trained on a re-fitted base, which the merges start from."""
        from ..models.loading import storage_dtype_of

        quant, source = quantize_source(ctx)
        base = ctx.current.path
        if refit is not None:
            base, source = refit.base, refit.source
        return cls(base=base, adapter=adapter, source=source, quantize=quant,
                   meta={**meta, "base_description": ctx.current.describe() + (" re-fitted (gptq)" if refit else "")},
                   storage_dtype=storage_dtype_of(ctx.original.path), requantize_from=cfg.requantize_from)


def quantize_source(ctx: "RunContext") -> tuple[Any, Path]:
    """``(quantize stage config, folder it started from)`` of the last quantize stage before this one, or
    ``(None, current model folder)`` when none quantized the model."""
    from ..pipeline import stage_dir_name

    stages = ctx.recipe.stages[: ctx.stage_index]
    q = next((i for i in range(len(stages) - 1, -1, -1) if stages[i].type == "quantize"), None)
    if q is None:
        return None, ctx.current.path
    source = ctx.original.path
    for j in range(q):
        result = ctx.results.get(j)
        if result is not None and result.model_dir:
            source = ctx.run_dir / stage_dir_name(j, stages[j]) / result.model_dir
    return stages[q], source


# ---------------------------------------------------------------------------------------------------------------------
# The three modes


def merge_keep(inputs: MergeInputs, target: Path, ctx: "RunContext") -> dict:
    from ..models.loading import read_meta

    base_meta = read_meta(inputs.base)
    with atomic_dir(target / "model") as tmp:
        link_tree(inputs.base, tmp / BASE_DIR)
        for name in ADAPTER_FILES:
            shutil.copy2(inputs.adapter / name, tmp / name)
        _copy_tokenizer(inputs.base, tmp)
        for name in ("config.json", "generation_config.json"):  # what tools look for in a model folder
            if (inputs.base / name).is_file():
                shutil.copy2(inputs.base / name, tmp / name)
        atomic_write_json(tmp / "llmcompress.json", {
            "format": PEFT_FORMAT, "base": BASE_DIR, "merge": "keep", "base_meta": base_meta, **inputs.meta,
            "method": _method(base_meta, "keep"), "versions": _versions()})
    folder = target / "model"
    return {"size_bytes": weight_bytes(folder), "base_bytes": weight_bytes(folder / BASE_DIR),
            "adapter_bytes": (folder / "adapter_model.safetensors").stat().st_size}


def merge_dequantized(inputs: MergeInputs, target: Path, ctx: "RunContext") -> dict:
    from ..models.loading import read_meta

    meta = {**inputs.meta, "merge": "dequantized", "method": _method(read_meta(inputs.base), "dequantized")}
    with atomic_dir(target / "model") as tmp:
        write_merged(inputs, True, tmp, meta)
    return {"size_bytes": weight_bytes(target / "model")}


def merge_requantize(inputs: MergeInputs, target: Path, ctx: "RunContext") -> dict:
    from ..context import ModelHandle
    from ..models.loading import read_meta
    from ..utils.memory import collect

    if inputs.quantize is None:  # the recipe validator stops this earlier; kept for Python callers
        raise RecipeError("`merge: requantize` needs a quantize stage before the lora stage. Fix: add one, or use "
                          "`keep` / `dequantized`")
    dense_dir = target / ".requantize-dense"
    shutil.rmtree(dense_dir, ignore_errors=True)
    dense_dir.mkdir(parents=True)
    # in the original's storage dtype, as the quantize stage first read it (gptq keeps dense parts in its input's)
    write_merged(inputs, inputs.requantize_from == "dequantized", dense_dir, {"source": "merged for requantize"})
    collect()  # the quantized base the merge read, before the quantizer loads the dense folder
    sub = dataclasses.replace(ctx, current=ModelHandle("compressed", dense_dir, ctx.runtime), stage_dir=target)
    t = time.perf_counter()
    try:
        result = inputs.quantize.run(sub)  # writes <target>/model, exactly as the quantize stage did
    finally:
        sub.current.release()
        shutil.rmtree(dense_dir, ignore_errors=True)
    folder = target / "model"
    meta = read_meta(folder)
    meta.update({**inputs.meta, "merge": "requantize", "requantize_from": inputs.requantize_from,
                 "method": _method(meta, "requantize")})
    atomic_write_json(folder / "llmcompress.json", meta)
    return {"size_bytes": weight_bytes(folder), "quantize_seconds": round(time.perf_counter() - t, 3),
            "requantize_from": inputs.requantize_from,
            "quantize": {k: v for k, v in result.data.items() if k in ("method", "bits", "quantized_modules")}}


def write_merged(inputs: MergeInputs, dequantized: bool, folder: Path, meta: dict) -> None:
    """Write into ``folder`` the weights quantize started from (``dequantized``: every quantized layer replaced by
    its dequantized weight) plus ``s·BA`` on every adapted layer, summed in float32 and stored in the original's
    storage dtype, with ``meta`` (plus ``dequantized_modules``: how many layers were dequantized) as its
    ``llmcompress.json``.

    A tensor at a time: the source's safetensors files are rewritten file by file, each merged weight computed as
    its turn comes, so memory holds the quantized base and one dense tensor instead of a dense model (1.7B-shaped
    NF4 + distill run: the lora stage peaked at 2.5x the bf16 size with the dense model built in memory). Where the
    source's files do not hold every merged weight under its module's name (no safetensors, checkpoint names that
    transformers renames on load, a tied head with an adapter, llmcompress formats other than plain hf), the dense
    model is built in memory and saved instead (``merged_dense``)."""
    from peft import PeftModel

    from ..models.loading import load_model, read_meta, save_model, to_model_keys, torch_dtype, write_meta
    from ..utils.tensorfile import rewrite_safetensors, safetensors_header
    from .layers import lora_layers

    storage = torch_dtype(inputs.storage_dtype or "float32")
    files = sorted(Path(inputs.source).glob("*.safetensors"))
    stored = {k for f in files for k in safetensors_header(f)[1] if k != "__metadata__"}
    base, tokenizer = load_model(inputs.base, "cpu", "float32")  # fresh: no forward pass has touched it
    quantized = {name: m for name, m in base.named_modules() if _quantized(m)} if dequantized else {}
    adapted = dict(lora_layers(PeftModel.from_pretrained(base, str(inputs.adapter), is_trainable=False)))
    merged = {f"{name}.weight": name for name in (*quantized, *adapted)}
    streamable = (files and set(merged) <= stored and read_meta(inputs.source).get("format") == "hf"
                  and set(to_model_keys(base, dict.fromkeys(stored))) == stored)
    if not streamable:
        del base, quantized, adapted
        dense, tokenizer, replaced = merged_dense(inputs, dequantized)
        save_model(dense, tokenizer, folder, {**meta, "dequantized_modules": replaced}, inputs.storage_dtype)
        return

    def value_for(key: str, t: Any) -> Any:
        name = merged.get(key)
        if name is None:
            return t
        layer = quantized.get(name)
        # as merged_dense: the source weight as the storage dtype holds it, or the dequantized layer, in float32
        w = (dequantize_layer(layer) if layer is not None else t.to(storage)).float()
        return w + lora_delta(adapted[name]) if name in adapted else w

    for f in files:
        rewrite_safetensors(f, folder / f.name, lambda _, dtype: storage if dtype.is_floating_point else dtype,
                            value_for)
    _copy_config(inputs.source, folder, str(storage).removeprefix("torch."))
    tokenizer.save_pretrained(folder)
    write_meta(folder, {**meta, "dequantized_modules": len(quantized)})


def _copy_config(src: Path, dst: Path, dtype: str) -> None:
    """The source's config (with the dtype the weights are now stored in), generation config and shard index (with
    the shards' new total size)."""
    from ..utils.io import read_json
    from ..utils.tensorfile import safetensors_header

    config = read_json(src / "config.json")
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    atomic_write_json(dst / "config.json", config)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        data.setdefault("metadata", {})["total_size"] = sum(
            v["data_offsets"][1] - v["data_offsets"][0] for f in dst.glob("*.safetensors")
            for k, v in safetensors_header(f)[1].items() if k != "__metadata__")
        atomic_write_json(dst / index.name, data)


def merged_dense(inputs: MergeInputs, dequantized: bool) -> tuple[Any, Any, int]:
    """``(dense model, tokenizer, layers dequantized)``: the weights quantize started from (``dequantized``: with
    every quantized layer replaced by its dequantized weight) plus ``s·BA`` on every adapted layer, summed in float32
    and held in the original's storage dtype, layer by layer (the folder is saved in that dtype anyway: the same
    bits as a whole float32 copy, at a quarter of the memory for a bf16 model)."""
    from ..models.loading import load_model, torch_dtype

    storage = inputs.storage_dtype or "float32"
    base, tokenizer = load_model(inputs.base, "cpu", "float32")  # fresh: no forward pass has touched it
    dense = load_model(inputs.source, "cpu", storage)[0]
    quantized = {name: m for name, m in base.named_modules() if _quantized(m)} if dequantized else {}
    replaced = len(quantized)
    for name, delta in adapter_deltas(base, inputs.adapter):
        layer = quantized.pop(name, None)
        w = dequantize_layer(layer) if layer is not None else dense.get_submodule(name).weight.detach().float()
        _set_weight(dense, name, (w.float() + delta).to(torch_dtype(storage)))
    for name, module in quantized.items():  # quantized layers without an adapter
        _set_weight(dense, name, dequantize_layer(module).float().to(torch_dtype(storage)))
    return dense, tokenizer, replaced


def adapter_deltas(base: Any, adapter: Path) -> Iterator[tuple[str, Any]]:
    """``(module name, s·B@A (out, in) float32)`` for each layer the adapter in ``adapter`` adapts on ``base``
    (unmerged), one layer at a time."""
    from peft import PeftModel

    from .layers import lora_layers

    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    for name, layer in lora_layers(model):
        yield name, lora_delta(layer)


# ---------------------------------------------------------------------------------------------------------------------
# Loading a `keep` folder, and helpers


def load_peft(path: str | Path, device: str, dtype: str, **kwargs: Any):
    """FORMATS["peft"]: the base folder through ``load_model``, then the adapter on it (not merged)."""
    from peft import PeftModel

    from ..models.loading import load_model

    path = Path(path)
    base = load_model(path / BASE_DIR, device, dtype, **kwargs)[0]
    return PeftModel.from_pretrained(base, str(path), is_trainable=False).eval()


def lora_delta(layer: Any, adapter: str = "default"):
    """``scaling · B @ A`` (out, in) in float32, computed here: peft's ``get_delta_weight`` is missing on some
    quantized layer types (GPTQ) and would dequantize the base on others."""
    a = layer.lora_A[adapter].weight.detach().float()  # (r, in)
    b = layer.lora_B[adapter].weight.detach().float()  # (out, r)
    return (b @ a) * layer.scaling[adapter]


def dequantize_layer(module: Any):
    """The dense ``(out, in)`` weight a quantized linear layer computes with (bnb, hqq, torchao, rtn; dense as is)."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if hasattr(module, "W_q") or weight is not None:
        w = dequantize_module_weight(module)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point():
            return w.detach()
    if hasattr(module, "dequantize"):
        return module.dequantize().detach()
    raise RecipeError(f"cannot dequantize a `{type(module).__name__}` layer. Fix: use `merge: keep` or "
                      "`requantize`, and `init: default`")


def _quantized(module: Any) -> bool:
    """A linear-like layer whose weight is not a plain float tensor (what ``dequantized`` must expand)."""
    import torch

    from .layers import _is_linear_like

    if not _is_linear_like(module):
        return False
    w = getattr(module, "weight", None)
    return not (type(module) is torch.nn.Linear and type(w.data if w is not None else None) is torch.Tensor
                and w.is_floating_point())


def _set_weight(model: Any, name: str, weight: Any) -> None:
    import torch

    layer = model.get_submodule(name)
    if not isinstance(layer, torch.nn.Linear):
        raise RecipeError(f"`{name}` is a `{type(layer).__name__}` in the dense model, not a Linear: cannot merge")
    layer.weight = torch.nn.Parameter(weight.to(layer.weight.device, layer.weight.dtype), requires_grad=False)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (no extra disk), copying where links are impossible."""
    for p in Path(src).rglob("*"):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst / rel)
        except OSError:
            shutil.copy2(p, dst / rel)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from transformers import AutoTokenizer

    if (Path(src) / "preprocessor_config.json").is_file():  # a vision model: its image processor
        shutil.copy2(Path(src) / "preprocessor_config.json", Path(dst) / "preprocessor_config.json")
        return
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))


def _method(base_meta: dict, mode: str) -> str:
    base = base_meta.get("method") or base_meta.get("source") or "model"
    return f"{base} + lora ({mode})"


def _versions() -> dict:
    from ..models.loading import versions

    return versions()


# ---------------------------------------------------------------------------------------------------------------------
# Measuring several merge modes side by side


def measure_merges(ctx: "RunContext", merges: dict[str, dict], extra: dict[str, dict] | None = None) -> dict:
    """Perplexity and KL vs the original of each merged folder (added to ``merges`` and ``extra``, more folders
    ``{"path": ...}`` under the stage folder, in place), on the windows of the last evaluate stage before this one
    (so that the report can set them against the model before the adapter), else the evaluate stage's default
    windows; returns how they were measured."""
    import shutil

    from ..eval import reference
    from ..eval.kl import compare
    from ..eval.perplexity import PerplexityConfig, load_corpus, make_windows
    from ..models.loading import load_model

    before = [s for s in ctx.recipe.stages[: ctx.stage_index] if s.type == "evaluate" and s.perplexity is not None]
    pcfg = before[-1].perplexity if before else PerplexityConfig()
    entries = [*merges.values(), *(extra or {}).values()]
    store = ctx.stage_dir / "original-logits"  # one model in memory at a time: the original's logits go to disk
    with ctx.task("lora: measure merge modes", total=len(entries) + 1) as advance:
        original, tokenizer = ctx.load(ctx.original)
        windows = make_windows(tokenizer, load_corpus(pcfg.corpus, ctx.recipe.base_dir), pcfg)
        reference.write(store, original, windows)
        del original
        ctx.original.release()
        advance(1)
        try:
            for info in entries:
                model = load_model(ctx.stage_dir / info["path"], ctx.runtime.device, ctx.runtime.dtype)[0]
                result = compare(store, model, windows)
                info.update({"perplexity": result.perplexity["perplexity"], "kl_mean": result.kl["kl_mean"],
                             "top1_agreement": result.kl["top1_agreement"]})
                del model
                advance(1)
        finally:
            shutil.rmtree(store, ignore_errors=True)
    return {"perplexity": pcfg.model_dump(), "backend": "hf", **ctx.runtime.describe()}
