"""Load vision model folders: ``(model, image processor)``, whatever layout the stages saved.

``models.loading.load_model`` hands a vision folder here. ``hf`` folders (dense, pruned, bnb, torchao int8) load
with the task's auto class; rtn folders of vision models (Linear and Conv2d layers) are rebuilt here; the other
layouts (hqq, torchao int4, dynamic int8, structured, peft) go through the shared ``FORMATS`` loaders, which build
the architecture with the auto class of the folder's kind.

Upstream quirks worked around: ``transformers.AutoImageProcessor`` (the top-level name) is a placeholder that
demands torchvision in transformers 5.17, while ``transformers.models.auto.image_processing_auto.AutoImageProcessor``
loads the PIL processors without it; bitsandbytes' int8 matmul (``Linear8bitLt``) fails on 4-D inputs
(``(B, H, W, C)``, as ConvNeXt's MLP gets) on CPU, so those layers flatten their input to 2-D around the call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LLMCompressError


def load_vision(path: str | Path, device: str, dtype: str, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, image processor)`` of a vision model folder (any layout llmcompress writes)."""
    from ..models.loading import FORMATS, read_meta

    path = Path(path)
    fmt = read_meta(path).get("format", "hf") if path.is_dir() else "hf"
    try:
        if fmt == "hf":
            model = _load_hf(path, device, dtype, **kwargs)
        elif fmt == "rtn":
            model = load_rtn_vision(path, device, dtype)
        else:
            model = FORMATS.get(fmt)(path, device=device, dtype=dtype, **kwargs)
    except ImportError as e:
        raise LLMCompressError(_import_fix(path, e)) from None
    except OSError as e:
        raise LLMCompressError(f"could not load model `{path}`: {e}") from None
    except RuntimeError as e:  # weights missing or of another shape than the folder's config says
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMCompressError(f"could not load model `{path}`: its weights do not fit its config ({first}). "
                               "Fix: point at a folder llmcompress or save_pretrained wrote whole (re-run the "
                               "stage that wrote it with `--fresh`).") from None
    fix_bnb_int8_(model)
    return model, load_processor(path)


def _load_hf(path: Path, device: str, dtype: str, **kwargs: Any):
    from ..models.loading import torch_dtype
    from ..models.family import auto_model_class

    model = auto_model_class(path).from_pretrained(str(path), dtype=torch_dtype(dtype), **kwargs)
    if device != "cpu" and getattr(model, "hf_quantizer", None) is None:
        model = model.to(device)
    return model.eval()


def _import_fix(path: Path, e: ImportError) -> str:
    text = str(e)
    if "timm" in text.lower():
        from .timm import TIMM_FIX

        return f"`{path}` is a timm model, and timm does not import here ({text.strip().splitlines()[0]}). {TIMM_FIX}"
    return f"could not load model `{path}`: {text.strip()}"


def load_processor(path: str | Path) -> Any:
    """The folder's image processor, through the PIL backend unless torchvision imports."""
    import importlib.util

    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    kwargs = {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}
    folder = Path(path)
    if (folder / "base").is_dir() and not (folder / "preprocessor_config.json").is_file():
        folder = folder / "base"  # a LoRA `keep` folder: the processor sits with the base
    try:
        return AutoImageProcessor.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise LLMCompressError(f"`{path}` has no image processor (preprocessor_config.json): {e}. Fix: save "
                               "the model's image processor into the folder (`processor.save_pretrained(folder)`).",
                               ) from None


def load_rtn_vision(path: Path, device: str, dtype: str):
    """An rtn folder of a vision model: RTNLinear and RTNConv2d layers where llmcompress.json lists them."""
    from ..models.loading import read_meta
    from ..models.skeleton import load_swapped, set_module
    from ..quant.rtn import __getattr__ as rtn_attr
    from .layers import rtn_conv_class

    info = read_meta(path)["rtn"]
    rtn_linear, rtn_conv = rtn_attr("RTNLinear"), rtn_conv_class()

    def swap(model, state, dt) -> None:
        for name in info["modules"]:
            lin = model.get_submodule(name)
            gs = lin.in_features if info["group_size"] == -1 else info["group_size"]
            set_module(model, name, rtn_linear(lin.in_features, lin.out_features, info["bits"], gs,
                                               info["symmetric"], lin.bias is not None, dtype=dt))
        for name, gs in (info.get("conv_modules") or {}).items():
            conv = model.get_submodule(name)
            set_module(model, name, rtn_conv.empty(conv, info["bits"], gs, info["symmetric"], dt))

    return load_swapped(path, device, dtype, swap)


def fix_bnb_int8_(model: Any) -> int:
    """Flatten the input of every bnb ``Linear8bitLt`` to 2-D around its call (see the module docstring)."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Linear8bitLt" and not getattr(m, "_llmcompress_flat", False):
            m.register_forward_pre_hook(_flatten_input)
            m.register_forward_hook(_restore_output)
            m._llmcompress_flat = True
            n += 1
    return n


def _flatten_input(module, args):
    x = args[0]
    module._llmcompress_shape = x.shape[:-1] if x.dim() > 2 else None
    return (x.reshape(-1, x.shape[-1]), *args[1:]) if x.dim() > 2 else None


def _restore_output(module, args, output):
    shape = module._llmcompress_shape
    return output.reshape(*shape, output.shape[-1]) if shape is not None else None
