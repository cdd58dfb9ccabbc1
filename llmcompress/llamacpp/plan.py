"""Mixed precision under a bit budget for GGUF (``target_bits``): measured per-tensor sensitivity decides which
tensors keep more bits, the way Q4_K_M keeps attn_v/ffn_down higher, but measured on the model rather than fixed.

    - {type: quantize, method: gguf, gguf_type: Q5_1, target_bits: 6.15}

How (all rounding is llama.cpp's own, with the stage's importance matrix):

1. Each candidate type is made once for every tensor it fits (``llama-quantize --pure``; the k-quants only for
   tensors whose rows are a multiple of 256), then read back with gguf-py: the exact rounding error ``ΔW`` llama.cpp
   makes for every (tensor, type), and its exact size in bytes.
2. Sensitivity: the diagonal (empirical) Fisher information of every weight, the mean squared gradient of the
   next-token loss over ``plan_samples`` calibration windows, by transformers on the dense source. The loss a tensor's
   rounding costs is estimated as ``½ Σ F ⊙ ΔW²`` (second order; the usual HAWQ/SqueezeLLM estimate).
3. Allocation: for a multiplier λ every tensor takes the type minimising ``cost + λ·bytes``; λ is bisected so that
   the weights fit ``target_bits`` (bits per weight over every quantized matrix, token embedding included): the
   optimum on the convex hull of each tensor's (bytes, cost) points; what is left of the budget then goes greedily
   to the upgrades that buy the most per byte and still fit.
4. The plan goes to ``llama-quantize --tensor-type-file`` (one anchored name per tensor) and ``--token-embedding-type``.
   ``plan.json`` in the stage folder keeps every tensor's candidates and the choice, so the file can be remade by hand.

Cost on the default model (135M, 2 shared cores): about 3-5 minutes (9 candidate files + 16 backward passes).
Memory: the F16 weights and their Fisher in float32 (8 bytes per weight) beside the source model; for an 8B model
that is 64 GB, so ``target_bits`` is for models that fit the machine several times over.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LLMCompressError

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Candidate ggml types by default: the legacy block-32 types (any row length) and the k-quants (rows % 256 == 0).
DEFAULT_TYPES = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")
#: Types the planner can measure: those llama-quantize makes and gguf-py dequantizes, with their block length.
BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "iq4_nl": 32, "q2_k": 256, "q3_k": 256,
         "q4_k": 256, "q5_k": 256, "q6_k": 256, "iq4_xs": 256}
#: llama-quantize file type that makes the same ggml type with --pure.
_FTYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "iq4_nl": "IQ4_NL",
          "q2_k": "Q2_K", "q3_k": "Q3_K_S", "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "iq4_xs": "IQ4_XS"}
EMBEDDING = "token_embd.weight"


def weights_f32(gguf_file: Path) -> dict[str, "np.ndarray"]:
    """{name: float32 array (rows, cols)} of the 2-D weight tensors of a GGUF file, dequantized by gguf-py."""
    from gguf import GGUFReader

    return {t.name: _array(t) for t in GGUFReader(str(gguf_file)).tensors if _is_matrix(t)}


def _is_matrix(t: Any) -> bool:
    return t.name.endswith(".weight") and len([d for d in t.shape if int(d) > 1]) == 2


def _array(t: Any) -> "np.ndarray":
    import numpy as np
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def fisher(model: Any, windows: "torch.Tensor", progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """{parameter name: mean squared gradient of the next-token loss} of every 2-D parameter, one window per pass."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for row in windows:
            model.zero_grad(set_to_none=True)
            x = row.unsqueeze(0).to(next(model.parameters()).device)
            model(input_ids=x, labels=x).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach().float().cpu() ** 2
            if progress:
                progress(1)
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return {n: (a / len(windows)).numpy() for n, a in acc.items()}


def map_fisher(fish: dict[str, "np.ndarray"], source: dict[str, Any], gguf_w: dict[str, "np.ndarray"],
               ) -> dict[str, "np.ndarray"]:
    """The Fisher of every GGUF tensor, in the GGUF's layout: each GGUF matrix is found among the source's parameters
    by its rows (the converter renames tensors and permutes q/k rows for its rope layout; it never changes a value
    beyond the F16 cast), and the Fisher rows are permuted the same way."""
    import hashlib

    import numpy as np

    def rows(w: "np.ndarray") -> list[bytes]:
        return [r.tobytes() for r in np.ascontiguousarray(w, dtype=np.float16)]

    def key(r: list[bytes]) -> str:  # the same rows in any order give the same key
        return hashlib.sha1(b"".join(sorted(r))).hexdigest()

    found = {key(rows(w)): n for n, w in source.items() if n in fish}
    out = {}
    for name, w in gguf_w.items():
        r = rows(w)
        cand = found.get(key(r))
        if cand is None:
            raise LLMCompressError(
                f"target_bits: GGUF tensor `{name}` {tuple(w.shape)} matches no parameter of the source model row for "
                "row, so its sensitivity cannot be measured. Fix: remove `target_bits` (or set `tensor_types` by "
                "hand) for this model.")
        index = {b: i for i, b in enumerate(rows(source[cand]))}
        out[name] = fish[cand][np.asarray([index[b] for b in r])]
    return out


def pure_args(kind: str, weights: dict[str, "np.ndarray"], scratch: Path) -> tuple[list[str], str] | None:
    """llama-quantize arguments and file type that put every tensor ``kind`` fits into ``kind`` (the rest at q8_0,
    not measured), or None when it fits none. ``--pure`` keeps llama-quantize from mixing in other types; it also
    turns off its fallback for rows a k-quant does not divide, so those tensors are named one by one."""
    fits = [n for n, w in weights.items() if w.shape[-1] % BLOCK[kind] == 0]
    if not fits:
        return None
    if len(fits) == len(weights):
        return ["--pure", "--token-embedding-type", kind], _FTYPE[kind]
    names = scratch / f"plan-{kind}.txt"
    names.write_text("".join(f"^{re.escape(n)}$={kind}\n" for n in fits if n != EMBEDDING))
    return ["--pure", "--tensor-type-file", str(names), "--token-embedding-type",
            kind if EMBEDDING in fits else "q8_0"], "Q8_0"


def measure(types: list[str], quantize: Callable[[list[str], str, Path], None], fish: dict[str, "np.ndarray"],
            weights: dict[str, "np.ndarray"], scratch: Path, log: Callable[[str], None]) -> dict[str, dict]:
    """{tensor: {ggml type: {"bytes", "cost"}}} for every tensor a candidate type fits; ``quantize(args, ftype,
    out)`` runs llama-quantize on the F16 file."""
    from gguf import GGUFReader

    table: dict[str, dict] = {n: {} for n in weights}
    for kind in types:
        out = scratch / f"plan-{kind}.gguf"
        t0 = time.perf_counter()
        how = pure_args(kind, weights, scratch)
        if how is None:
            log(f"gguf plan: {kind} fits no tensor of this model (rows not a multiple of {BLOCK[kind]})")
            continue
        quantize(*how, out)
        for t in GGUFReader(str(out)).tensors:
            if t.name not in weights or t.tensor_type.name.lower() != kind:
                continue  # a tensor this type does not fit (left at the file's base type)
            d = _array(t) - weights[t.name]
            table[t.name][kind] = {"bytes": int(t.n_bytes), "cost": 0.5 * float((fish[t.name] * d * d).sum())}
        out.unlink(missing_ok=True)
        log(f"gguf plan: {kind} measured in {time.perf_counter() - t0:.0f}s")
    return table


def allocate(table: dict[str, dict], budget_bytes: float, n_params: int) -> dict[str, str]:
    """{tensor: type} minimising the summed cost within ``budget_bytes`` (Lagrangian; see the module docstring)."""
    options = {n: list(c.items()) for n, c in table.items() if c}

    def pick(lam: float) -> tuple[dict[str, str], int]:
        plan = {n: min(o, key=lambda kv: kv[1]["cost"] + lam * kv[1]["bytes"])[0] for n, o in options.items()}
        return plan, sum(table[n][k]["bytes"] for n, k in plan.items())

    smallest = sum(min(v["bytes"] for _, v in o) for o in options.values())
    if smallest > budget_bytes:
        raise LLMCompressError(
            f"target_bits: even the smallest candidate type of every tensor takes {smallest * 8 / n_params:.2f} "
            f"bits per weight, above the target. Fix: raise `target_bits`, or add a smaller type to `plan_types`.")
    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget_bytes:  # a price per byte high enough to fit
        hi *= 10
    for _ in range(100):
        mid = (lo + hi) / 2
        if pick(mid)[1] > budget_bytes:
            lo = mid
        else:
            hi = mid
    plan, used = pick(hi)
    # The Lagrangian optimum stops before a step that does not fit whole (say the embedding's next type); spend the
    # rest greedily on the upgrades that buy the most per byte and still fit.
    while True:
        best = None
        for n, opts in options.items():
            cur = table[n][plan[n]]
            for kind, c in opts:
                extra, gain = c["bytes"] - cur["bytes"], cur["cost"] - c["cost"]
                if gain > 0 and 0 < extra <= budget_bytes - used and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, kind, extra)
        if best is None:
            return plan
        plan[best[1]] = best[2]
        used += best[3]


def type_file(plan: dict[str, str], path: Path) -> tuple[Path, str | None]:
    """Write llama-quantize's --tensor-type-file (anchored names); the embedding's type is returned apart
    (llama-quantize sets it only through --token-embedding-type)."""
    lines = [f"^{re.escape(n)}$={k}" for n, k in plan.items() if n != EMBEDDING]
    path.write_text("\n".join(lines) + "\n")
    return path, plan.get(EMBEDDING)


def summary(plan: dict[str, str], table: dict[str, dict], n_params: int) -> dict[str, Any]:
    """Counts per (tensor kind, type), bits per weight and estimated cost of the chosen plan."""
    counts: dict[str, dict[str, int]] = {}
    for n, k in plan.items():
        kind = re.sub(r"^blk\.\d+\.", "", n).removesuffix(".weight")
        counts.setdefault(kind, {})[k] = counts.setdefault(kind, {}).get(k, 0) + 1
    total = sum(table[n][k]["bytes"] for n, k in plan.items())
    return {"types": counts, "bytes": total, "bits_per_weight": round(total * 8 / n_params, 4),
            "estimated_cost": sum(table[n][k]["cost"] for n, k in plan.items())}


def save(path: Path, plan: dict[str, str], table: dict[str, dict], info: dict) -> None:
    path.write_text(json.dumps({**info, "plan": plan, "candidates": table}, indent=1))
