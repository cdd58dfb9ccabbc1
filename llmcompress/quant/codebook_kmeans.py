"""The arithmetic of codebook quantization (quant/codebook.py): weighted k-means over many rows at once, the packing
of the centroid indices, the sensitivities that weigh the k-means (SqueezeLLM's Fisher diagonal, or the inputs'
``diag(XᵀX)``), and the bits a layer costs. Only torch; no model-format knowledge here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


def weighted_kmeans(w: "torch.Tensor", s: "torch.Tensor", k: int,
                    iterations: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Weighted 1-D k-means (Lloyd) of every row of ``w`` at once; deterministic.

    Two starts per row, and the one with the lower weighted error wins: the weighted quantiles (SqueezeLLM's kind of
    start, dense where the sensitive weights are) and a uniform grid over the row's range (the levels round-to-nearest
    would use). Both matter: on weights that already sit on a small grid (SmolLM2 is a dequantized Q4_1 model) the
    quantiles repeat a value, and duplicate centroids never separate (SmolLM2 gate_proj, 4 bits, groups of 64, plain
    k-means: MSE 3.24e-4 from quantiles, 1.23e-4 from the grid); on smooth weights the quantiles can win. Lloyd never
    raises the error it starts from, so the result is never worse than either start.

    Args:
        w: (R, n) values, one codebook per row.
        s: (R, n) non-negative sensitivities (the weight each value's squared error carries).
        k: centroids per row.
        iterations: Lloyd iterations from each start.

    Returns:
        ``(codebook, index)``: (R, k) float16 centroids, sorted, and (R, n) int64 indices of the nearest centroid,
        assigned *after* rounding the centroids to float16, so ``codebook.gather(1, index)`` is exactly the stored
        weight.
    """
    import torch

    w, s = w.float(), s.float()
    s = s + 1e-12 * s.mean(dim=1, keepdim=True).clamp(min=1e-30)  # a row of zero sensitivity: plain k-means
    vals, order = w.sort(dim=1)  # 1-D clusters are intervals of the sorted values: sums come from prefix sums
    sv = s.gather(1, order).double()
    zero = vals.new_zeros(w.shape[0], 1, dtype=torch.float64)
    pre_s = torch.cat([zero, sv.cumsum(1)], 1)  # (R, n + 1)
    pre_sw = torch.cat([zero, (sv * vals.double()).cumsum(1)], 1)
    best, best_err = None, None
    for c in (weighted_quantiles(w, s, k), uniform_grid(w, k)):  # (R, k), sorted
        c = _lloyd(c, vals, pre_s, pre_sw, iterations).to(torch.float16).sort(dim=1).values
        idx = assign(w, c.float())
        err = (s * (w - c.float().gather(1, idx)) ** 2).sum(1)  # (R,)
        if best is None:
            best, best_err = (c, idx), err
        else:
            take = err < best_err
            best = (torch.where(take[:, None], c, best[0]), torch.where(take[:, None], idx, best[1]))
    return best


def _lloyd(c: "torch.Tensor", vals: "torch.Tensor", pre_s: "torch.Tensor", pre_sw: "torch.Tensor",
           iterations: int) -> "torch.Tensor":
    """Lloyd iterations on sorted rows ``vals`` with prefix sums of the sensitivities (``pre_s``) and of
    sensitivity x value (``pre_sw``): a cluster is an interval of the sorted values, so its weighted mean is two
    look-ups. Returns the (R, k) centroids, sorted."""
    import torch

    ends = torch.full((vals.shape[0], 1), vals.shape[1], dtype=torch.long, device=vals.device)
    for _ in range(iterations):
        # values up to the midpoint between two neighbouring centroids belong to the lower one (as `assign` does)
        cut = torch.searchsorted(vals, ((c[:, 1:] + c[:, :-1]) / 2).contiguous(), right=True)  # (R, k - 1)
        lo, hi = torch.cat([torch.zeros_like(ends), cut], 1), torch.cat([cut, ends], 1)  # (R, k) cluster bounds
        den = pre_s.gather(1, hi) - pre_s.gather(1, lo)
        num = pre_sw.gather(1, hi) - pre_sw.gather(1, lo)
        c = torch.where(den > 0, num / den.clamp(min=1e-300), c.double()).float().sort(dim=1).values
    return c


def uniform_grid(w: "torch.Tensor", k: int) -> "torch.Tensor":
    """(R, k) initial centroids: the midpoints of k equal steps over each row's range [min, max]."""
    import torch

    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    return lo + (hi - lo) * (torch.arange(k, dtype=w.dtype, device=w.device) + 0.5) / k


def weighted_quantiles(w: "torch.Tensor", s: "torch.Tensor", k: int) -> "torch.Tensor":
    """(R, k) initial centroids: the values at the weighted quantiles (j + 0.5) / k of each row."""
    import torch

    vals, order = w.sort(dim=1)
    cum = s.gather(1, order).cumsum(1)
    cum = cum / cum[:, -1:].clamp(min=1e-30)
    levels = ((torch.arange(k, dtype=w.dtype, device=w.device) + 0.5) / k).expand(w.shape[0], k).contiguous()
    pos = torch.searchsorted(cum.contiguous(), levels).clamp(max=w.shape[1] - 1)
    return vals.gather(1, pos)


def assign(w: "torch.Tensor", c: "torch.Tensor") -> "torch.Tensor":
    """(R, n) index of the nearest of the (R, k) centroids ``c`` (sorted along each row) for every value of ``w``.

    1-D: the nearest centroid is found by binary search among the midpoints of neighbouring centroids, O(n log k)
    instead of a (R, n, k) distance tensor."""
    import torch

    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()  # (R, k - 1)
    return torch.searchsorted(mids, w.contiguous())


def weighted_error(w: "torch.Tensor", s: "torch.Tensor", q: "torch.Tensor") -> float:
    """``sum(s * (w - q)²)``: the loss the weighted k-means minimises (SqueezeLLM's Fisher-weighted objective)."""
    return float((s.float() * (w.float() - q.float()) ** 2).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Packing: 8 indices of `bits` bits -> `bits` bytes (exact for 2, 3 and 4 bits; a row is padded to a multiple of 8)


def pack_indices(idx: "torch.Tensor", bits: int) -> "torch.Tensor":
    """(rows, n) indices in [0, 2**bits) -> (rows, ceil(n / 8) * bits) uint8."""
    import torch

    rows, n = idx.shape
    q = torch.nn.functional.pad(idx.long(), (0, (-n) % 8)).reshape(rows, -1, 8)
    word = (q << (torch.arange(8, device=q.device) * bits)).sum(-1)  # (rows, n/8) holding 8 * bits bits
    parts = (word[..., None] >> (torch.arange(bits, device=q.device) * 8)) & 0xFF  # little-endian bytes
    return parts.to(torch.uint8).reshape(rows, -1)


def unpack_indices(packed: "torch.Tensor", bits: int, n: int) -> "torch.Tensor":
    """Inverse of ``pack_indices``: (rows, n) int64."""
    import torch

    rows = packed.shape[0]
    b = packed.long().reshape(rows, -1, bits)
    word = (b << (torch.arange(bits, device=b.device) * 8)).sum(-1)
    q = (word[..., None] >> (torch.arange(8, device=b.device) * bits)) & (2**bits - 1)
    return q.reshape(rows, -1)[:, :n]


def layer_bits(out_f: int, in_f: int, bits: int, group: int) -> int:
    """Bits one layer stores: the packed indices (rows padded to 8 indices) plus fp16 codebooks of 2**bits entries."""
    return out_f * (-(-in_f // 8) * 8) * bits + out_f * (in_f // group) * 2**bits * 16


# ---------------------------------------------------------------------------------------------------------------------
# Sensitivities


def fisher_diagonal(model: Any, ids: "torch.Tensor", targets: dict[str, Any],
                    advance: Callable[..., None] = lambda *a, **k: None) -> dict[str, "torch.Tensor"]:
    """SqueezeLLM's sensitivity: the diagonal Fisher, ``sum over windows of (dLoss/dW)²`` of the LM loss, per weight.

    One window at a time (batch 1), in float32; only the ``targets``' weights get gradients. Returns name ->
    (out, in) float32 on the CPU. The parameters' dtypes and ``requires_grad`` flags are restored afterwards (exactly:
    bf16 -> fp32 -> bf16 is lossless); buffers are left alone (``model.float()`` and back would round the rotary
    ``inv_freq`` table to bf16 and change the model).
    """
    import torch

    flags = {p: (p.requires_grad, p.dtype) for p in model.parameters()}
    for p in flags:
        p.data = p.data.float()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in targets.values():
            lin.weight.requires_grad_(True)
        fisher = {n: torch.zeros_like(lin.weight, dtype=torch.float32) for n, lin in targets.items()}
        dev = next(model.parameters()).device
        for row in ids:
            x = row[None].to(dev)
            with torch.enable_grad():
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
            for n, lin in targets.items():
                fisher[n] += lin.weight.grad.float() ** 2
                lin.weight.grad = None
            advance()
    finally:
        for p, (grad, dtype) in flags.items():
            p.requires_grad_(grad)
            p.data = p.data.to(dtype)
    return {n: f.cpu() for n, f in fisher.items()}


def input_second_moments(model: Any, ids: "torch.Tensor", targets: dict[str, Any],
                         advance: Callable[..., None] = lambda *a, **k: None) -> dict[str, "torch.Tensor"]:
    """``diag(XᵀX)`` of every target's inputs over the calibration windows (as GPTQ's Hessian diagonal and AWQ's
    activation scale measure): name -> (in,) float32 on the CPU."""
    import torch

    sums = {n: torch.zeros(lin.in_features, dtype=torch.float32) for n, lin in targets.items()}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] += (x * x).sum(0).cpu()
        return fn

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in targets.items()]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None].to(dev))
                advance()
    finally:
        for h in handles:
            h.remove()
    return sums
