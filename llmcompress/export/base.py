"""What every export format shares: the checks a recipe can run before any weights load, the dense weights of a
quantized model, and the fresh-process reload check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..utils.proc import die_with_parent

if TYPE_CHECKING:
    from ..context import RunContext
    from ..stage import StageConfig
    from .stage import ExportStage

#: Methods whose saved folder is llmcompress's own layout (``llmcompress.json`` format != hf): plain
#: ``from_pretrained`` cannot rebuild their layers. torchao-int4wo is one of them on CPU only (checked at run time).
OWN_LAYOUT_METHODS = ("rtn", "hqq", "dynamic-int8")
#: ``llmcompress.json`` keys describing those layouts; an export that rewrites the weights drops them.
LAYOUT_KEYS = ("rtn", "hqq", "torchao")


class Exporter:
    """One export format. Subclasses set the class fields and implement ``export``."""

    #: Who loads the output, in words (cards, summaries).
    consumer: ClassVar[str] = ""
    #: ``library_name`` of the model card.
    library: ClassVar[str] = "transformers"

    def check(self, stage: "ExportStage", quantize: "StageConfig | None") -> str | None:
        """A problem with exporting what ``quantize`` (the recipe's quantize stage, None if none) made, or None.

        Runs when the recipe loads (no torch): the message names the fix.
        """
        return None

    def export(self, stage: "ExportStage", ctx: "RunContext", out: Path) -> dict[str, Any]:  # pragma: no cover
        """Write the export into the empty folder ``out``; return what the card and the stage result report."""
        raise NotImplementedError

    def verify(self, stage: "ExportStage", ctx: "RunContext", out: Path, info: dict) -> dict[str, Any]:
        """Reload ``out`` in a fresh process as the consumer does; compare logits with the evaluated model."""
        return reload_check(ctx, "AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)", out)

    def load_code(self, folder: str, info: dict) -> str:
        """Python that loads the export (for the card)."""
        return (
            "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{folder}", dtype=torch.bfloat16)\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")'
        )


def method_of(quantize: "StageConfig | None") -> str | None:
    return getattr(quantize, "method", None) if quantize is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# Dense weights of a quantized model


def dense_weight(module, dtype) -> Any:
    """The weight a quantized linear layer computes with, dequantized, as a float32 ``(out, in)`` tensor.

    rtn and gptq layers dequantize themselves; any other layer is probed: ``layer(I) - bias`` is its weight, exactly
    as its kernel uses it (one-hot inputs make every product and sum exact).
    """
    import torch

    from ..quant.compressed import int_layer_weight

    if type(module).__name__ == "RTNLinear" or hasattr(module, "dequantize_weight"):  # rtn, gptqmodel
        return int_layer_weight(module)
    n_in = module.in_features
    cols = []
    with torch.no_grad():
        for start in range(0, n_in, 1024):
            eye = torch.eye(n_in, dtype=dtype)[start:start + 1024]
            y = module(eye).float()
            bias = getattr(module, "bias", None)
            if bias is not None:
                y = y - bias.float()
            cols.append(y)
    return torch.cat(cols).T.contiguous()


def dense_state_dict(model, dtype) -> dict[str, Any]:
    """The model's state dict in plain transformers names with every quantized layer dequantized (float32)."""
    from ..quant.compressed import quantized_linears

    quantized = quantized_linears(model)
    prefixes = tuple(f"{name}." for name in quantized)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, module in quantized.items():
        state[f"{name}.weight"] = dense_weight(module, dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().float()
    return state


def plain_config(model):
    """A copy of the model's config without its ``quantization_config``: the config of the dense model."""
    import copy

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Reload check


def reload_check(ctx: "RunContext", loader: str, folder: Path, inputs: dict | None = None,
                 unit: str = "tokens") -> dict[str, Any]:
    """Load the export in a fresh Python process the way its consumer does and compare its logits with the model
    the run evaluates, on the same 32 tokens of text (or on ``inputs``, e.g. ``{"pixel_values": ...}``).

    ``loader``: a Python expression for the model, with ``folder``, ``dtype`` and ``transformers`` in scope.
    """
    import torch

    model, tokenizer = ctx.current.load()
    if inputs is None:
        ids = tokenizer("def quantize(model, bits=4):\n    return model  # a short probe text for the reload check",
                        return_tensors="pt").input_ids[:, :32]
        inputs = {"input_ids": ids}
    with torch.no_grad():
        ours = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.float().cpu()
    probe = folder.parent / f".{folder.name}.probe.pt"
    torch.save({"inputs": {k: v.cpu() for k, v in inputs.items()}}, probe)
    code = (
        "import torch, json, sys, transformers\n"
        f"torch.set_num_threads({ctx.runtime.threads})\n"
        "from transformers import AutoModelForCausalLM\n"
        f"folder, dtype = {str(folder)!r}, torch.{ctx.runtime.dtype}\n"
        f"model = ({loader}).eval()\n"
        f"inputs = torch.load({str(probe)!r})['inputs']\n"
        "with torch.no_grad():\n"
        "    logits = model(**inputs).logits.float()\n"
        f"torch.save(logits, {str(probe)!r})\n"
    )
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                             preexec_fn=die_with_parent())
        if run.returncode != 0:
            from ..errors import LLMCompressError

            raise LLMCompressError(f"the export in {folder} did not load in a fresh process:\n{run.stderr[-2000:]}")
        theirs = torch.load(probe)
    finally:
        probe.unlink(missing_ok=True)
    diff = (theirs - ours).abs()
    first = next(iter(inputs.values()))
    return {
        "tokens": int(first.shape[1] if unit == "tokens" else first.shape[0]),
        **({"unit": unit} if unit != "tokens" else {}),
        "max_abs_logit_diff": round(float(diff.max()), 6),
        "max_abs_logit": round(float(ours.abs().max()), 4),
        "top1_agreement": round(float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()), 4),
    }


def copy_folder(src: Path, out: Path) -> list[str]:
    """Copy a model folder's files (not our run's leftovers such as gptqmodel's quant_log.csv)."""
    import shutil

    files = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and p.name not in ("quant_log.csv", "README.md"):
            shutil.copy2(p, out / p.name)
            files.append(p.name)
    return files


def write_meta(out: Path, meta: dict, export: dict) -> None:
    """``llmcompress.json`` of the export: the source model's metadata plus how it was exported."""
    from ..models.loading import META, versions
    from ..utils.io import atomic_write_json

    atomic_write_json(out / META, {**meta, "export": export, "versions": {**meta.get("versions", {}), **versions()}})


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def fresh_copy(ctx: "RunContext"):
    """The current model loaded anew from its folder, not the copy earlier stages ran: gptqmodel's CPU kernel
    rewrites its buffers on the first forward (qzeros become floats), after which ``dequantize_weight`` fails."""
    from ..models.loading import load_model

    kwargs = dict(ctx.current.load_kwargs)
    qc = read_config(ctx.current.path).get("quantization_config") or {}
    packed = qc.get("quant_method") == "compressed-tensors"
    if packed:  # (rtn's folders) compressed-tensors keeps layers packed, without a `weight`: dequantized at load
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model, tokenizer = load_model(ctx.current.path, ctx.runtime.device, ctx.runtime.dtype, **kwargs)
    if packed:  # the scales and zero points it leaves beside each dense weight
        for module in model.modules():
            if module._parameters.get("weight") is not None:
                for extra in ("weight_scale", "weight_zero_point", "weight_shape", "weight_packed", "weight_g_idx"):
                    module._parameters.pop(extra, None)
    return model, tokenizer


def dense_copy(ctx: "RunContext"):
    """A float32 transformers model holding the current model's weights, every quantized layer dequantized."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.loading import torch_dtype
    from ..utils.tensorfile import no_init

    model, tokenizer = fresh_copy(ctx)
    state = dense_state_dict(model, torch_dtype(ctx.runtime.dtype))
    config = plain_config(model)
    with no_init():
        dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, _ = dense.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        dense.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing:
        raise RuntimeError(f"dequantized state dict lacks {missing[:5]}")
    return dense.eval(), tokenizer
