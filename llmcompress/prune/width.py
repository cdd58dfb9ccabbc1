"""Width pruning of language models (as Minitron, Muralidharan et al., 2024): remove MLP channels, attention heads
(whole KV groups, or query heads within each group) and hidden (embedding) channels, ranked on calibration text.

    - {type: prune, method: width, target: 0.2}                        # 20% of the parameters, from the MLPs
    - {type: prune, method: width, target: 0.2, hidden_size: 512}      # hidden fixed, the MLP width solved
    - {type: prune, method: width, intermediate_size: 1024, heads: 6}  # explicit sizes

Importance, measured in one pass of the unpruned model over the calibration text:
- an MLP channel c: its contribution to the block's output, sum over tokens of a_c^2 * ||W_down[:, c]||^2, where a
  is the input of ``down_proj`` (``importance: contribution``); or Minitron's mean |a_c| (``activation``);
- a query head: the energy of its share of ``o_proj``'s output (``contribution``) or the mean L2 norm of its output
  (``activation``); a KV group: the sum over its query heads;
- a hidden channel: the sum over every RMSNorm output (both per layer and the final one) of y_c^2 (``contribution``)
  or of |y_c| (``activation``).
Each layer keeps its own best channels and heads, the same number in every layer, so that config.json can say the
new sizes and the folder stays a plain transformers checkpoint.
Hidden channels are one choice for the whole model (the residual stream is shared).

No existing library is used for the cut itself: torch-pruning's dependency graph would find the same coupled
dimensions, but it neither ranks by calibration activations the way Minitron does nor writes a transformers config;
NVIDIA modelopt's Minitron pruning needs Megatron/NeMo models and a CUDA build (docs/notes/issue20-prune.md). The cut
is index selection on known module names, ~100 lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import RecipeError
from ..models.walk import configs
from .shrink import Shape, ShrinkConfig, calibrate, decoder, fraction_target, keep_cols_, keep_rows_, with_

if TYPE_CHECKING:
    import torch

    from ..context import RunContext


class WidthConfig(ShrinkConfig):
    """Remove MLP channels, attention heads and hidden channels: ``{type: prune, method: width, target: 0.2}``."""

    method: Literal["width"] = "width"
    target: float | None = Field(None, description="Share of the model's parameters to remove (0 < target < 1), "
                                 "reached by shrinking the `solve_for` dimension; other sizes given are kept fixed.")
    solve_for: Literal["intermediate_size", "hidden_size"] = Field(
        "intermediate_size", description="The size `target` sets (rounded down to `multiple_of`).")
    intermediate_size: int | None = Field(None, ge=1, description="MLP channels kept in every layer.")
    heads: int | None = Field(None, ge=1, description="Query heads kept in every layer (a multiple of the KV heads "
                              "kept; each KV group keeps heads / kv_heads of its query heads).")
    kv_heads: int | None = Field(None, ge=1, description="KV heads (groups) kept in every layer, with their query "
                                 "heads.")
    hidden_size: int | None = Field(None, ge=1, description="Hidden (embedding) channels kept.")
    multiple_of: int = Field(32, ge=1, description="A size `target` solves is rounded down to a multiple of this "
                             "(kernels and quantization groups like widths divisible by 32-128).")
    importance: Literal["contribution", "activation"] = Field(
        "contribution", description="How pieces are ranked: their output energy (activation x weight norm) or "
        "Minitron's mean activation.")

    _target = field_validator("target")(classmethod(lambda cls, v: fraction_target(v)))

    @model_validator(mode="after")
    def _what(self) -> "WidthConfig":
        sizes = {k: getattr(self, k) for k in ("intermediate_size", "heads", "kv_heads", "hidden_size")}
        if self.target is None and all(v is None for v in sizes.values()):
            raise ValueError("say how much to remove: `target: 0.2` (a share of the parameters) or a size to keep "
                             "(`intermediate_size`, `heads`, `kv_heads`, `hidden_size`)")
        if self.target is not None and sizes[self.solve_for] is not None:
            raise ValueError(f"`target` sets `{self.solve_for}` (`solve_for`), and `{self.solve_for}` is given too. "
                             f"Fix: remove one, or set `solve_for` to the other dimension")
        if self.target is None and "solve_for" in self.model_fields_set:
            raise ValueError("`solve_for` applies to `target`, which is not set. Fix: remove it, or add `target`")
        return self

    def describe(self) -> str:
        return f"width {self.target:.0%}" if self.target is not None else "width"

    # -----------------------------------------------------------------------------------------------------------------

    def plan(self, shape: Shape) -> Shape:
        where = f"method width ({shape.describe()})"
        kv = self.kv_heads if self.kv_heads is not None else shape.kv_heads
        if kv > shape.kv_heads:
            raise RecipeError(f"{where}: `kv_heads: {kv}` is more than the model's {shape.kv_heads}. Fix: keep at "
                              f"most {shape.kv_heads}")
        heads = self.heads if self.heads is not None else kv * shape.group
        if heads % kv:
            options = ", ".join(str(kv * g) for g in range(1, shape.group + 1))
            raise RecipeError(f"{where}: {heads} query heads do not divide into the {kv} KV groups kept (each group "
                              f"keeps the same number of its query heads). Fix: `heads:` one of {options}")
        if heads // kv > shape.group:
            raise RecipeError(f"{where}: {heads} query heads over {kv} KV groups is {heads // kv} per group, and the "
                              f"model's groups have {shape.group}. Fix: at most {kv * shape.group} heads")
        new = with_(shape, heads=heads, kv_heads=kv)
        for key, attr in (("intermediate_size", "intermediate"), ("hidden_size", "hidden")):
            value = getattr(self, key)
            if value is not None:
                if value > getattr(shape, attr):
                    raise RecipeError(f"{where}: `{key}: {value}` is more than the model's {getattr(shape, attr)}. "
                                      f"Fix: a size below {getattr(shape, attr)}")
                new = with_(new, **{attr: value})
        if self.target is not None:
            new = self._solve(shape, new, where)
        if new == shape:
            raise RecipeError(f"{where}: these sizes are the model's own, so nothing would be removed. Fix: give a "
                              "smaller size, or a `target`")
        return new

    def _solve(self, shape: Shape, new: Shape, where: str) -> Shape:
        """``new`` with the `solve_for` dimension at the largest multiple of `multiple_of` that removes `target`."""
        attr = "intermediate" if self.solve_for == "intermediate_size" else "hidden"
        budget = (1 - self.target) * shape.params()  # type: ignore[operator]
        size = getattr(shape, attr) // self.multiple_of * self.multiple_of
        while size >= self.multiple_of:
            if with_(new, **{attr: size}).params() <= budget:
                return with_(new, **{attr: size})
            size -= self.multiple_of
        rest = with_(new, **{attr: 0}).params()
        raise RecipeError(
            f"{where}: removing {self.target:.0%} of the parameters would take `{self.solve_for}` below "
            f"{self.multiple_of}: the rest of the model alone holds {rest / shape.params():.0%} of them. Fix: a lower "
            f"`target`, or also shrink another dimension (`heads`, `kv_heads`, `hidden_size`)")

    # -----------------------------------------------------------------------------------------------------------------

    def shrink_(self, model: Any, ids: Any, shape: Shape, new: Shape, ctx: "RunContext") -> dict:
        scores = importance(model, ids, shape, self.importance)
        _, layers = decoder(model)
        kept: dict[str, Any] = {}
        if (new.heads, new.kv_heads) != (shape.heads, shape.kv_heads):
            for i, layer in enumerate(layers):
                kept.setdefault("heads", []).append(_cut_heads_(layer.self_attn, scores["heads"][i], shape, new))
        if new.intermediate != shape.intermediate:
            for i, layer in enumerate(layers):
                idx = _top(scores["mlp"][i], new.intermediate)
                keep_rows_(layer.mlp.gate_proj, idx)
                keep_rows_(layer.mlp.up_proj, idx)
                keep_cols_(layer.mlp.down_proj, idx)
        if new.hidden != shape.hidden:
            idx = _top(scores["hidden"], new.hidden)
            _cut_hidden_(model, idx)
            kept["hidden_channels_kept"] = len(idx)
        _write_config(model, new)
        return {"importance": self.importance, **({"heads_kept": kept["heads"]} if "heads" in kept else {})}


def _top(score: "torch.Tensor", k: int) -> "torch.Tensor":
    """Indices of the ``k`` highest scores, in their original order."""
    return score.topk(k).indices.sort().values


def importance(model: Any, ids: Any, shape: Shape, how: str) -> dict[str, Any]:
    """Scores of every MLP channel (per layer), query head (per layer) and hidden channel, from one calibration pass."""
    import torch

    base, layers = decoder(model)
    d = shape.head_dim
    mlp = [torch.zeros(shape.intermediate, dtype=torch.float64) for _ in layers]
    heads = [torch.zeros(shape.heads, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(shape.hidden, dtype=torch.float64)

    def mlp_hook(i: int):
        down = layers[i].mlp.down_proj

        def hook(module, args, output):
            a = args[0].detach().reshape(-1, shape.intermediate).double()
            if how == "activation":
                mlp[i] += a.abs().sum(0)
            else:
                mlp[i] += (a * a).sum(0) * down.weight.detach().double().pow(2).sum(0)

        return hook

    def head_hook(i: int):
        o = layers[i].self_attn.o_proj

        def hook(module, args, output):
            x = args[0].detach().reshape(-1, shape.heads, d).double()  # (tokens, heads, d)
            if how == "activation":
                heads[i] += x.norm(dim=-1).sum(0)
            else:
                w = o.weight.detach().double().reshape(-1, shape.heads, d)  # (out, heads, d)
                heads[i] += torch.einsum("thd,ohd->tho", x, w).pow(2).sum((0, 2))

        return hook

    def norm_hook(module, args, output):
        y = output.detach().reshape(-1, shape.hidden).double()
        hidden.add_(y.abs().sum(0) if how == "activation" else (y * y).sum(0))

    hooks: dict[Any, Any] = {}
    for i, layer in enumerate(layers):
        hooks[layer.mlp.down_proj] = mlp_hook(i)
        hooks[layer.self_attn.o_proj] = head_hook(i)
        hooks[layer.input_layernorm] = norm_hook
        hooks[layer.post_attention_layernorm] = norm_hook
    hooks[base.norm] = norm_hook
    calibrate(model, ids, hooks)
    return {"mlp": mlp, "heads": heads, "hidden": hidden}


def _cut_heads_(attn: Any, score: "torch.Tensor", shape: Shape, new: Shape) -> list[int]:
    """Keep ``new.kv_heads`` KV groups (highest summed score) and ``new.heads / new.kv_heads`` query heads in each."""
    import torch

    d, group, per = shape.head_dim, shape.group, new.heads // new.kv_heads
    by_group = score.reshape(shape.kv_heads, group)
    groups = _top(by_group.sum(1), new.kv_heads)
    q_heads = [int(g) * group + int(j) for g in groups for j in _top(by_group[g], per)]

    def rows(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])

    keep_rows_(attn.q_proj, rows(q_heads))
    keep_cols_(attn.o_proj, rows(q_heads))
    kv_rows = rows([int(g) for g in groups])
    keep_rows_(attn.k_proj, kv_rows)
    keep_rows_(attn.v_proj, kv_rows)
    attn.num_key_value_groups = per
    return q_heads


def _cut_hidden_(model: Any, idx: "torch.Tensor") -> None:
    """Keep the hidden channels ``idx`` everywhere the residual stream is read or written."""
    import torch

    base, layers = decoder(model)
    embed = base.embed_tokens
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed.weight
    with torch.no_grad():
        embed.weight = torch.nn.Parameter(embed.weight.index_select(1, idx).clone(), requires_grad=False)
    embed.embedding_dim = len(idx)
    for norm in [base.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        with torch.no_grad():
            norm.weight = torch.nn.Parameter(norm.weight.index_select(0, idx).clone(), requires_grad=False)
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            keep_cols_(lin, idx)
        keep_rows_(a.o_proj, idx)
        keep_rows_(m.down_proj, idx)
    head = model.get_output_embeddings()
    if head is not None:
        if tied:
            head.weight = embed.weight
            head.in_features = len(idx)
        else:
            keep_cols_(head, idx)


def _write_config(model: Any, new: Shape) -> None:
    """The new sizes into the model's config (the text config of a multimodal one), head_dim written explicitly."""
    for cfg in configs(model):
        cfg.hidden_size = new.hidden
        cfg.intermediate_size = new.intermediate
        cfg.num_attention_heads = new.heads
        cfg.num_key_value_heads = new.kv_heads
        cfg.head_dim = new.head_dim
