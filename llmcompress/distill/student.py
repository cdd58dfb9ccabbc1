"""The student of a distill stage: checks on what can train (before any weights load), loading it with fp32
master weights, choosing what trains (all weights, or a LoRA adapter), and saving it as an ordinary folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RecipeError
from ..utils.io import read_config

if TYPE_CHECKING:
    from ..context import ModelHandle, RunContext
    from .config import DistillSettings


def check_student(cfg: "DistillSettings", student: "ModelHandle", teacher: "ModelHandle", where: str) -> None:
    """Refuse what cannot train here, from the folders' configs (no weights): a quantized or GGUF student, a teacher
    with another vocabulary, hidden states of another size when ``hidden_weight`` > 0."""
    fmt = student.meta.get("format", "hf")
    s_conf = _config(student.path)
    if fmt != "hf" or s_conf.get("quantization_config"):
        raise RecipeError(f"{where}: the student is a quantized model (format `{fmt}`), whose integer weights "
                          "AdamW cannot update. Fix: distill before the quantize stage (prune -> distill -> "
                          "quantize), or train an adapter on the quantized model with the lora stage "
                          "(`objective: distill`)")
    t_conf = _config(teacher.path)
    s_vocab, t_vocab = _text(s_conf).get("vocab_size"), _text(t_conf).get("vocab_size")
    if s_vocab and t_vocab and s_vocab != t_vocab:
        raise RecipeError(f"{where}: the teacher's vocabulary has {t_vocab} tokens and the student's {s_vocab}: "
                          "logits cannot be compared token by token. Fix: a teacher with the student's tokenizer")
    if cfg.hidden_weight > 0:
        s_h, t_h = _text(s_conf).get("hidden_size"), _text(t_conf).get("hidden_size")
        if s_h != t_h:
            raise RecipeError(f"{where}: `hidden_weight` compares last hidden states, and the teacher's have {t_h} "
                              f"features, the student's {s_h} (a width-pruned hidden size). Fix: `hidden_weight: 0`")


def _config(path: Path) -> dict:
    f = Path(path) / "config.json"
    return read_config(f) if f.is_file() else {}


def _text(conf: dict) -> dict:
    return conf.get("text_config") or conf


def load_student(cfg: "DistillSettings", ctx: "RunContext", seed: int) -> tuple[Any, Any, dict]:
    """``(model, tokenizer, info)``: the current model in fp32 (master weights), what trains set up."""
    import torch

    from ..models.loading import load_model

    ctx.current.release()
    ctx.original.release()
    model, tokenizer = load_model(ctx.current.path, ctx.runtime.device, "float32")
    info: dict[str, Any] = {}
    if cfg.train == "lora":
        from ..lora.init import wrap

        torch.manual_seed(seed)
        model = wrap(model, cfg, init_lora_weights=True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        if not cfg.train_embeddings:
            emb = model.get_input_embeddings()
            emb.weight.requires_grad_(False)
            out = model.get_output_embeddings()
            if out is not None and out.weight is emb.weight:
                info["note"] = "the output layer shares the embeddings' weight (tied): frozen with them"
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["total_params"] = sum(p.numel() for p in model.parameters())
    return model, tokenizer, info


def save_student(model: Any, tokenizer: Any, cfg: "DistillSettings", ctx: "RunContext", extra: dict) -> Path:
    """Merge a LoRA adapter, and save the student as a plain transformers folder in the base's storage dtype."""
    from ..models.loading import save_model, storage_dtype_of

    if cfg.train == "lora":
        model = model.merge_and_unload()
    meta = {"method": "distill", "stage": "distill", "config": cfg.model_dump(mode="json"),
            "base": ctx.current.describe(), **extra}
    with ctx.new_model_dir() as tmp:
        save_model(model, tokenizer, tmp, meta, storage_dtype=storage_dtype_of(ctx.current.path))
    return ctx.stage_dir / "model"
