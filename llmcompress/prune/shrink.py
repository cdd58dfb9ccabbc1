"""What the structural pruning methods of language models share (``width``, ``depth``): the shape they read from
config.json, the parameter count that shape has, the calibration pass, and the save-and-report step.

A structural method removes whole pieces (MLP channels, attention heads, hidden channels, decoder layers) and writes
the new sizes into config.json, so the folder is an ordinary transformers checkpoint of a smaller model: plain
``from_pretrained``, vLLM and llama.cpp's converter load it as they load the original. Every width stays uniform
across layers for that reason (a transformers config has one ``intermediate_size`` for all layers).

The shape is checked against the model's config.json when the recipe is validated (``check_model``), before any
weights load: a cut that removes everything or nothing, heads that do not divide the KV groups, a depth cut deeper
than the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from ..data.calibration import (CalibrationConfig, as_sources, check_calibration, check_source_list, load_sources,
                                record_sources)
from ..errors import RecipeError
from ..stage import StageConfig, StageResult, by_family
from ..utils.io import read_config

if TYPE_CHECKING:
    from ..context import RunContext

#: config.json model types whose decoder layers are ``self_attn.{q,k,v,o}_proj`` + ``mlp.{gate,up,down}_proj`` with
#: RMSNorm-style ``input_layernorm`` / ``post_attention_layernorm`` (what the structural methods know how to cut).
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "smollm3")


@dataclass(frozen=True)
class Shape:
    """The sizes of a llama-like decoder that structural pruning changes (read from config.json)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def of_config(cls, conf: dict, where: str = "prune") -> "Shape":
        """The shape of a config.json dict; RecipeError when the architecture is not one the methods cut."""
        if "vision_config" in conf:
            raise RecipeError(f"{where}: structural pruning of a vision-language model's language part is not "
                              "supported (the projector feeds the hidden size it would cut). Fix: use an "
                              "unstructured method (magnitude, wanda) on it.")
        text = conf.get("text_config") or conf
        model_type = text.get("model_type", conf.get("model_type"))
        if model_type not in LLAMA_LIKE:
            raise RecipeError(
                f"{where}: structural pruning knows llama-like decoders ({', '.join(LLAMA_LIKE)}), and this model is "
                f"`{model_type}`. Fix: use an unstructured method (wanda, sparsegpt, magnitude) for it.")
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return cls(hidden=hidden, intermediate=int(text["intermediate_size"]), heads=heads,
                   kv_heads=int(text.get("num_key_value_heads") or heads),
                   head_dim=int(text.get("head_dim") or hidden // heads), layers=int(text["num_hidden_layers"]),
                   vocab=int(text["vocab_size"]),
                   tied=bool(conf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                   qkv_bias=bool(text.get("attention_bias", model_type == "qwen2")))

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def params(self) -> int:
        """Parameters of a model of this shape (embeddings, decoder layers, final norm, an untied output layer)."""
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2
        if self.qkv_bias:
            attn += (self.heads + 2 * self.kv_heads) * d
        layer = attn + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def describe(self) -> str:
        return (f"hidden {self.hidden}, MLP {self.intermediate}, {self.heads} heads / {self.kv_heads} KV, "
                f"{self.layers} layers")


def folder_shape(folder: Path, where: str) -> Shape:
    return Shape.of_config(read_config(Path(folder) / "config.json"), where)


class ShrinkConfig(StageConfig):
    """Base of the structural methods (``type: prune``): calibration, validation against config.json, run."""

    type: Literal["prune"] = "prune"
    method: str
    calibration: CalibrationConfig | list[CalibrationConfig] = Field(
        default_factory=lambda: CalibrationConfig(samples=32, seq_len=256),
        description="Text whose activations rank the pieces (the default: builtin:mixed, 32 x 256 tokens), or a "
        "list of sources with one seq_len, used together.")

    @field_validator("calibration")
    @classmethod
    def _sources(cls, v: CalibrationConfig | list[CalibrationConfig]) -> CalibrationConfig | list[CalibrationConfig]:
        check_source_list(v, "calibration")
        return v

    changes_model: ClassVar[bool] = True
    #: The model's architecture changes: later stages are checked against the original's config.json no further.
    reshapes_model: ClassVar[bool] = True

    def preflight(self, base_dir: "Path | None" = None) -> None:
        for source in as_sources(self.calibration):
            check_calibration(source, base_dir)

    def check_model(self, model_dir: Path) -> None:
        """The cut fits the model (its config.json; no weights): RecipeError with the fix otherwise."""
        self.plan(folder_shape(model_dir, f"method {self.method}"))

    def plan(self, shape: Shape) -> Shape:
        """The shape after pruning (RecipeError when it removes nothing or everything)."""
        raise NotImplementedError

    def shrink_(self, model: Any, ids: Any, shape: Shape, new: Shape, ctx: "RunContext") -> dict:
        """Cut ``model`` to ``new`` in place, ranking pieces on the calibration ``ids``; returns figures."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.method

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from ..models.loading import save_model, storage_dtype_of
        from .base import check_dense, load_dense_copy

        check_dense(ctx.current)
        where = f"{self.label}: method {self.method}"
        shape = folder_shape(ctx.current.path, where)
        new = self.plan(shape)
        t0 = time.perf_counter()
        model, tokenizer = load_dense_copy(ctx)
        before = sum(p.numel() for p in model.parameters())
        ids = load_sources(self.calibration, tokenizer, ctx.recipe.base_dir, model=ctx.original)
        with ctx.task(f"prune {self.describe()}", total=None):
            info = self.shrink_(model, ids, shape, new, ctx)
        seconds = time.perf_counter() - t0
        after = sum(p.numel() for p in model.parameters())
        meta = {"method": self.method, "stage": "prune", "config": self.model_dump(mode="json"),
                "source": ctx.current.describe(), "shape": {"before": asdict(shape), "after": asdict(new)},
                "note": f"{self.method} pruning: {shape.describe()} -> {new.describe()}; a plain transformers "
                        "checkpoint of the smaller shape"}
        with ctx.task("save pruned model"), ctx.new_model_dir() as tmp:
            save_model(model, tokenizer, tmp, meta, storage_dtype=storage_dtype_of(ctx.current.path))
        del model  # later stages load the folder: what they measure is what a user loads
        ctx.set_current(ctx.stage_dir / "model")
        data = {
            "method": self.method, "shape_before": asdict(shape), "shape_after": asdict(new),
            "params_before": before, "params_after": after, "params_removed": 1 - after / before,
            "prune_seconds": round(seconds, 3), "size_bytes": ctx.current.size_bytes,
            "calibration": record_sources(self.calibration, ids), **info,
        }
        summary = {"method": self.describe(), "shape": f"{shape.describe()} -> {new.describe()}",
                   "parameters": f"{before / 1e6:.1f}M -> {after / 1e6:.1f}M ({1 - after / before:.1%} fewer)",
                   "time": f"{seconds:.1f}s", "size": f"{data['size_bytes'] / 2**20:.1f} MiB"}
        return StageResult(type="prune", label=self.label, model_dir="model", data=data, summary=summary)


def fraction_target(value: float | None) -> float | None:
    if value is not None and not 0 < value < 1:
        raise ValueError("must be the share of the model's parameters to remove, strictly between 0 and 1 "
                         "(e.g. 0.2 removes a fifth)")
    return value


def with_(shape: Shape, **sizes: int) -> Shape:
    return replace(shape, **sizes)


# ---------------------------------------------------------------------------------------------------------------------
# cutting modules in place


def keep_rows_(linear: Any, index: Any) -> None:
    """Keep the output rows ``index`` of an nn.Linear (and its bias), in place."""
    import torch

    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.index_select(0, index).clone(), requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.index_select(0, index).clone(), requires_grad=False)
    linear.out_features = len(index)


def keep_cols_(linear: Any, index: Any) -> None:
    """Keep the input columns ``index`` of an nn.Linear, in place."""
    import torch

    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.index_select(1, index).clone(), requires_grad=False)
    linear.in_features = len(index)


def decoder(model: Any) -> tuple[Any, Any]:
    """``(the base model holding embed_tokens/layers/norm, its ModuleList of decoder layers)``."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return base, base.layers


def calibrate(model: Any, ids: Any, hooks: dict[Any, Any], loss: bool = False) -> float | None:
    """Run ``model`` over the calibration ``ids`` (batches of 8) with forward hooks ``{module: hook}`` attached;
    with ``loss``, return the mean next-token loss over every predicted token."""
    from .layerwise import forward_passes

    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        return forward_passes(model, ids, loss)
    finally:
        for h in handles:
            h.remove()
