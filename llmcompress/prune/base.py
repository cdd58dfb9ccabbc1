"""What every pruning method shares: the stage fields (sparsity or N:M pattern, skip), which weights to zero given a
score, the refusal to prune quantized weights, and the save-and-report step.

Pruned weights are zeros in an ordinary dense ``save_pretrained`` checkpoint, stored in the source's dtype: whatever
loads the source loads it, and the size on disk does not shrink (that would take a sparse format and kernels).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import RecipeError
from ..models.walk import configs
from ..utils.patterns import check_regexes, matches_any
from ..stage import StageConfig, StageResult, by_family

if TYPE_CHECKING:
    import torch

    from ..context import RunContext

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class PruneConfig(StageConfig):
    """Base of all pruning methods (``type: prune``). Exactly one of ``sparsity`` and ``pattern``."""

    type: Literal["prune"] = "prune"
    method: str
    sparsity: float | None = Field(
        None, description="Unstructured: the fraction of each pruned layer's weights set to zero, 0 < s < 1."
    )
    pattern: str | None = Field(
        None, description='N:M structured, quoted ("2:4"): in every M consecutive input weights of a row keep the N '
        "largest-scoring, zero the other M - N. Sparsity is 1 - N/M.",
    )
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Linear layers left dense: exact module names, or regexes matched against the full name.",
    )

    changes_model: ClassVar[bool] = True

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError("must be a fraction strictly between 0 and 1 (e.g. 0.5 zeroes half of each layer)")
        return v

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise ValueError('write the pattern in quotes, e.g. pattern: "2:4" (YAML reads an unquoted 2:4 as the '
                             "number 124)")
        m = _PATTERN.match(str(v))
        if not m:
            raise ValueError('must be "N:M" (keep N of every M consecutive weights), e.g. "2:4"')
        n, m_ = int(m[1]), int(m[2])
        if not 0 < n < m_:
            raise ValueError('N and M must satisfy 0 < N < M ("N:M" keeps N of every M consecutive weights), '
                             'e.g. "2:4"')
        return f"{n}:{m_}"

    @field_validator("skip")
    @classmethod
    def _valid_regexes(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    @model_validator(mode="after")
    def _one_target(self) -> "PruneConfig":
        if (self.sparsity is None) == (self.pattern is None):
            fix = "remove one" if self.sparsity is not None else "add one"
            raise ValueError(
                "set exactly one of `sparsity` (unstructured, e.g. sparsity: 0.5) and `pattern` (N:M structured, "
                f'e.g. pattern: "2:4"); {"both are" if self.sparsity is not None else "neither is"} set. Fix: {fix}'
            )
        return self

    # -----------------------------------------------------------------------------------------------------------------

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        nm = self.n_m
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"{self.method} {self.pattern}" if self.pattern else f"{self.method} {self.sparsity:.0%}"

    def skips(self, module_name: str) -> bool:
        return matches_any(module_name, self.skip)

    def targets(self, model) -> list[tuple[str, Any]]:
        """``(name, nn.Linear)`` of every layer to prune; checks N:M divides each input width."""
        import torch

        out = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not self.skips(n)]
        if not out:
            raise RecipeError(f"`skip` {self.skip} leaves no linear layer to prune. Fix: skip fewer layers.")
        nm = self.n_m
        for name, lin in out if nm else []:
            if lin.in_features % nm[1]:
                raise RecipeError(
                    f'pattern "{self.pattern}": M = {nm[1]} does not divide the input width {lin.in_features} of '
                    f"`{name}`. Fix: add `{name}` to `skip`, or use an M that divides {lin.in_features}."
                )
        return out

    def prune(self, ctx: "RunContext") -> tuple[Any, Any, dict]:
        """Return ``(model, tokenizer, info)`` with the targets pruned; the model is saved by ``run``."""
        raise NotImplementedError

    @by_family
    def run(self, ctx: "RunContext") -> StageResult:
        from ..models.loading import save_model, storage_dtype_of

        check_dense(ctx.current)
        t0 = time.perf_counter()
        with ctx.task(f"prune {self.describe()}", total=None):
            model, tokenizer, info = self.prune(ctx)
        seconds = time.perf_counter() - t0
        pruned = info.pop("pruned")
        stats = sparsity_stats(model, pruned, before=ctx.current.load()[0])  # current: still the unpruned source
        meta = {"method": self.method, "stage": "prune", "config": self.model_dump(mode="json"),
                "source": ctx.current.describe(), "sparsity": stats["pruned_layers"],
                "note": f"pruned ({self.describe()}); the zeros are stored dense, so the size on disk does not shrink"}
        saved_dtype = storage_dtype_of(ctx.current.path)  # the source's: a bf16 model run in fp32 stays bf16 on disk
        with ctx.task("save pruned model"), ctx.new_model_dir() as tmp:
            save_model(model, tokenizer, tmp, meta, storage_dtype=saved_dtype)
        ctx.set_current(ctx.stage_dir / "model", loaded=(model, tokenizer))
        data = {
            "method": self.method,
            "requested_sparsity": self.target_sparsity,
            "pattern": self.pattern,
            "sparsity": stats,
            "prune_seconds": round(seconds, 3),
            "size_bytes": ctx.current.size_bytes,
            "saved_dtype": saved_dtype or str(model.dtype).removeprefix("torch."),
            "storage": "dense: zeros are stored as ordinary weights, so the size on disk and in memory does not shrink",
            **info,
        }
        summary = {
            "method": self.describe(),
            "sparsity": f"{stats['pruned_layers']:.1%} of pruned layers, "
            f"{stats['all_linear']:.1%} of all linear weights",
            "time": f"{seconds:.1f}s",
            "size": f"{data['size_bytes'] / 2**20:.1f} MiB (zeros stored dense)",
        }
        if self.n_m:
            data["pattern_holds"] = all(nm_pattern_holds(model.get_submodule(n).weight, *self.n_m) for n in pruned)
        return StageResult(type="prune", label=self.label, model_dir="model", data=data, summary=summary)


def check_dense(handle) -> None:
    """Refuse a model an earlier stage quantized: pruning scores and zeroes dense weights."""
    from ..quant import QUANTIZERS

    meta = handle.meta
    method = meta.get("method")
    if meta.get("format", "hf") != "hf" or method in QUANTIZERS:
        raise RecipeError(
            f"the model here is already quantized (`{method or meta.get('format')}`), and pruning needs dense weights. "
            "Fix: prune before quantizing (put the prune stage before the quantize stage)."
        )


def prune_mask(score: "torch.Tensor", cfg: PruneConfig, per_row: bool) -> "torch.Tensor":
    """Boolean mask of the weights to zero (True = prune), from a score of shape (out, in): lowest scores go.

    N:M: in each group of M consecutive inputs of a row, the M - N lowest. Unstructured: round(s * in) per output row
    when ``per_row`` (Wanda), else round(s * out * in) over the whole matrix (magnitude). Counts are exact even with
    tied scores (topk picks exactly k).
    """
    import torch

    out_f, in_f = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    nm = cfg.n_m
    if nm:
        n, m = nm
        groups = score.reshape(out_f, in_f // m, m)
        idx = groups.topk(m - n, dim=-1, largest=False).indices
        return mask.reshape(out_f, in_f // m, m).scatter_(-1, idx, True).reshape(out_f, in_f)
    if per_row:
        k = int(cfg.sparsity * in_f + 0.5)  # type: ignore[operator]
        return mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
    k = int(cfg.sparsity * score.numel() + 0.5)  # type: ignore[operator]
    return mask.view(-1).scatter_(0, score.reshape(-1).topk(k, largest=False).indices, True).view(out_f, in_f)


def load_dense_copy(ctx: "RunContext") -> tuple[Any, Any]:
    """A private copy of the current model (loaded afresh, with no other model held), checked to be dense."""
    model, tokenizer = ctx.working_copy()
    if getattr(model, "hf_quantizer", None) is not None:
        raise RecipeError(
            f"`{ctx.current.describe()}` loads as a quantized model ({type(model.hf_quantizer).__name__}), and pruning "
            "needs dense weights. Fix: start from the unquantized model and prune before quantizing."
        )
    return model, tokenizer


def apply_mask_(linear, mask: "torch.Tensor") -> None:
    """Zero ``linear.weight`` where ``mask`` is True, in place."""
    import torch

    with torch.no_grad():
        linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


def untie_(model, targets: list[tuple[str, Any]]) -> list[str]:
    """Give each target that shares its weight with another module (a tied lm_head) its own copy, so pruning it
    leaves the embedding alone. Returns the names untied."""
    import torch

    shared: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    untied = []
    for name, lin in targets:
        if shared.get(id(lin.weight), 0) > 1:
            lin.weight = torch.nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
            untied.append(name)
    if untied:
        for cfg in configs(model):
            cfg.tie_word_embeddings = False
    return untied


def sparsity_stats(model, pruned: list[str], before=None) -> dict[str, Any]:
    """Exact-zero fractions: of the pruned layers (overall and per layer type, e.g. ``q_proj``), of all linear weights
    (skipped ones included) and of all parameters; the least and most sparse pruned layer; and, given the model
    ``before`` pruning, the zeros the pruned layers already had (a padding row of a tied lm_head, say)."""
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_module = {n: (int((linears[n].weight == 0).sum()), linears[n].weight.numel()) for n in pruned}
    by_type: dict[str, list[int]] = {}
    for name, (z, t) in per_module.items():
        acc = by_type.setdefault(name.split(".")[-1], [0, 0])
        acc[0], acc[1] = acc[0] + z, acc[1] + t

    def frac(pairs) -> float:
        zeros, total = map(sum, zip(*pairs)) if pairs else (0, 0)
        return zeros / total if total else 0.0

    seen, all_linear, all_params = set(), [], []
    for m in linears.values():
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            all_linear.append((int((m.weight == 0).sum()), m.weight.numel()))
    all_params = [(int((p == 0).sum()), p.numel()) for p in model.parameters()]
    layer_fracs = {n: z / t for n, (z, t) in per_module.items()}
    return {
        "pruned_layers": frac(list(per_module.values())),
        "all_linear": frac(all_linear),
        "all_parameters": frac(all_params),
        "by_type": {k: v[0] / v[1] for k, v in sorted(by_type.items())},
        "min_layer": min(layer_fracs.items(), key=lambda kv: kv[1]) if layer_fracs else None,
        "max_layer": max(layer_fracs.items(), key=lambda kv: kv[1]) if layer_fracs else None,
        "zeros_before": None if before is None else frac(
            [(int((before.get_submodule(n).weight == 0).sum()), t) for n, (_, t) in per_module.items()]),
        "pruned_modules": len(pruned),
        "pruned_weights": sum(t for _, t in per_module.values()),
        "counted": "exact zeros in the weights after pruning (pre-existing zeros included)",
    }


def nm_pattern_holds(weight: "torch.Tensor", n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    out_f, in_f = weight.shape
    return bool(((weight.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())
