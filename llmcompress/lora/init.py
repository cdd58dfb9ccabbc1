"""Adapter inits: ``init(model, cfg, ctx) -> (peft_model, info)`` (registered in ``lora/__init__``).

- ``default``: peft's (A Kaiming-uniform, B zero): the model starts exactly as the base.
- ``loftq``: A, B start at the best rank-r approximation (truncated SVD) of the quantization error ``W - deq(Q)``,
  so base + adapter starts closer to the original weights. Stock peft's LoftQ quantizes on cuda only; this path
  keeps the quantized base as it is (one LoftQ step, as peft's ``replace_lora_weights_loftq``) and needs only a
  dequantized copy of each layer, so it runs on CPU and on any base we can dequantize (bnb, hqq, torchao).
- ``pissa``: A, B start at the principal singular vectors of W and the base keeps the residual (peft); float bases
  only. The saved adapter is converted to a plain LoRA on the unchanged base (peft's conversion, rank 2r).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..utils.patterns import matches_any
from .layers import _is_linear_like, lora_layers  # noqa: F401 - lora_layers: used by tests

if TYPE_CHECKING:
    from ..context import RunContext
    from .config import LoraSettings

PISSA_INIT_DIR = "pissa-init"


def init_default(model: Any, cfg: "LoraSettings", ctx: "RunContext") -> tuple[Any, dict]:
    return wrap(model, cfg, init_lora_weights=True), {}


def init_pissa(model: Any, cfg: "LoraSettings", ctx: "RunContext") -> tuple[Any, dict]:
    """PiSSA, then the initial adapter is saved so that the trained one can be converted to a plain LoRA."""
    import torch

    quantized = [n for n, m in model.named_modules() if _is_linear_like(m) and not isinstance(m, torch.nn.Linear)]
    if quantized or getattr(model, "hf_quantizer", None) is not None:
        raise RecipeError("`init: pissa` needs float weights (peft rewrites them), and this model is quantized. "
                          "Fix: use `init: loftq`, or put the lora stage before the quantize stage")
    peft_model = wrap(model, cfg, init_lora_weights="pissa")
    init_dir = ctx.stage_dir / PISSA_INIT_DIR
    peft_model.peft_config["default"].init_lora_weights = True  # the saved initial adapter must load as is
    peft_model.save_pretrained(str(init_dir))
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    return peft_model, {"_pissa_init_dir": str(init_dir)}


def init_loftq(model: Any, cfg: "LoraSettings", ctx: "RunContext") -> tuple[Any, dict]:
    """One LoftQ step against the existing quantized base: ``B A = svd_r(W - deq(Q)) / scaling``."""
    import torch

    from ..models.loading import load_model
    from .merge import dequantize_layer, quantize_source

    peft_model = wrap(model, cfg, init_lora_weights=True)
    _, source = quantize_source(ctx)
    dense = load_model(source, "cpu", "float32")[0]
    err_before, err_after, norm = 0.0, 0.0, 0.0
    for name, layer in lora_layers(peft_model):
        w = dense.get_submodule(name).weight.detach().float()  # (out, in)
        q = dequantize_layer(layer.get_base_layer()).float().to(w.device)
        e = w - q
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        r = layer.r["default"]
        root = s[:r].sqrt()
        scale = layer.scaling["default"] ** 0.5
        b, a = u[:, :r] * root / scale, root[:, None] * vh[:r] / scale  # (out, r), (r, in)
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(b)
            layer.lora_A["default"].weight.copy_(a)
        err_before += e.square().sum().item()
        err_after += (e - u[:, :r] * s[:r] @ vh[:r]).square().sum().item()
        norm += w.square().sum().item()
    del dense
    return peft_model, {"loftq_rel_error_before": (err_before / norm) ** 0.5,
                        "loftq_rel_error_after": (err_after / norm) ** 0.5}


# ---------------------------------------------------------------------------------------------------------------------
# Shared


def wrap(model: Any, cfg: "LoraSettings", **lora_kwargs: Any) -> Any:
    """``get_peft_model`` on the modules ``cfg.target_modules`` names, with errors that say what exists."""
    from peft import LoraConfig, get_peft_model

    from ..utils.envguard import import_tokenicer_cleanly
    from ..models.family import kind_of_config

    import_tokenicer_cleanly()  # peft's GPTQ dispatcher imports gptqmodel, whose tokenicer would move HF_HOME

    names = target_names(model, cfg.target_modules)
    vision = kind_of_config(model.config.to_dict())[0] == "vision"  # no causal-LM wrapper around an image model
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$",
                      task_type=None if vision else "CAUSAL_LM", **lora_kwargs)
    fsdp = getattr(getattr(cfg, "accelerate", None), "fsdp", None)
    # FSDP1 flattens each wrapped unit into one tensor of one dtype: the adapter keeps the base's dtype there (peft
    # upcasts it to fp32 otherwise: "Must flatten tensors with uniform dtype", seen on an H200 with torch 2.11)
    uniform = fsdp is not None and fsdp.version == 1
    packed = [n for n in names if hasattr(model.get_submodule(n), "weight_packed")]
    if packed:  # compressed-tensors layers run packed (no `weight`): peft fails on them with an AttributeError
        raise RecipeError(f"peft cannot put LoRA on these layers (compressed-tensors packed Linear, e.g. "
                          f"`{packed[0]}`): they hold packed integers, not a weight peft can wrap. Fix: quantize "
                          f"with a {_PEFT_METHODS} or none")
    try:
        return get_peft_model(model, lcfg, autocast_adapter_dtype=not uniform)
    except ValueError as e:
        if "not supported" not in str(e):
            raise
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in names})
        raise RecipeError(f"peft cannot put LoRA on these layers ({', '.join(kinds)}): {e} Fix: quantize with a "
                          f"{_PEFT_METHODS} or none") from None


_PEFT_METHODS = "method peft supports (bnb-nf4, bnb-int8, hqq, torchao-int8wo, gptq)"


def target_names(model: Any, targets: str | list[str]) -> list[str]:
    """Full names of the linear layers ``targets`` selects (``all-linear``: all but the output layer)."""
    out_emb = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if n and _is_linear_like(m) and m is not out_emb]
    if targets == "all-linear":
        return linear
    everything = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
    picked = [n for n in everything if matches_any(n, targets)]
    if not picked:
        short = sorted({n.rsplit(".", 1)[-1] for n in everything})
        raise RecipeError(f"target_modules {targets} match no linear layer of this model. Fix: use names from "
                          f"{', '.join(short)} (or regexes over full names like `model.layers.0.self_attn.q_proj`), "
                          "or `all-linear`")
    return picked


def save_adapter(peft_model: Any, path: Path, info: dict, dtype: str | None = None,
                 state_dict: dict | None = None) -> None:
    """peft's ``save_pretrained``; a PiSSA adapter is converted to a plain LoRA on the unchanged base first.

    ``dtype``: store the adapter's float tensors in this dtype (the original's storage dtype: bf16 halves an adapter
    trained in fp32; later stages measure the adapter as stored). ``state_dict``: the full weights when the model is
    sharded (FSDP gathers them; peft keeps the adapter's part).
    """
    init_dir = info.get("_pissa_init_dir")
    if init_dir:
        peft_model.save_pretrained(str(path), path_initial_model_for_weight_conversion=init_dir)
    else:
        peft_model.save_pretrained(str(path), **({"state_dict": state_dict} if state_dict is not None else {}))
    if dtype is not None:
        from safetensors.torch import load_file, save_file

        from ..models.loading import torch_dtype

        f = Path(path) / "adapter_model.safetensors"
        state = {k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})
