"""Masks that keep part of a tensor: by magnitude, by magnitude without outliers, at random, by magnitude rank.

Shared by the merge methods (TIES, DARE, breadcrumbs, DELLA) and by pruning. Magnitude masks find their threshold
by selection (a sampled bracket, then ``kthvalue`` on the few candidates inside it), never by sorting the tensor:
a full argsort of a large tensor is what makes other TIES implementations slow. Every mask keeps exactly the
requested count; ties at the threshold are broken by position (lower index first).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SAMPLE = 1 << 16  # elements sampled to bracket a threshold
_ROW_CHUNK = 1 << 22  # elements per chunk when ranking rows (bounds the scratch of the per-row sort)


def _kth_smallest(a: Tensor, k: int) -> Tensor:
    """The k-th smallest value (1-based) of a flat tensor, by selection on a sampled bracket.

    A strided sample estimates the value's quantile; a margin of a few standard errors brackets it; the exact
    answer is the kthvalue of the elements inside the bracket (a small tensor). Falls back to kthvalue of the
    whole tensor when the bracket misses.
    """
    n = a.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(a, k).values
    step = n // _SAMPLE
    sample = a[::step].contiguous()
    m = sample.numel()
    q = k / n
    margin = 4.0 * (q * (1 - q) / m) ** 0.5 + 4.0 / m
    lo_i = max(1, int((q - margin) * m))
    hi_i = min(m, int((q + margin) * m) + 1)
    lo = torch.kthvalue(sample, lo_i).values if q - margin > 0 else a.min()
    hi = torch.kthvalue(sample, hi_i).values if q + margin < 1 else a.max()
    below = int(torch.count_nonzero(a < lo))
    band = a[(a >= lo) & (a <= hi)]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(a, k).values


def smallest_mask(a: Tensor, k: int) -> Tensor:
    """Bool mask (a's shape) of exactly the ``k`` smallest entries of ``a``; ties broken by position."""
    return _count_mask(a, k, largest=False)


def largest_mask(a: Tensor, k: int) -> Tensor:
    """Bool mask of exactly the ``k`` largest entries of ``a``; ties broken by position."""
    return _count_mask(a, k, largest=True)


def _count_mask(a: Tensor, k: int, largest: bool) -> Tensor:
    flat = a.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(a, dtype=torch.bool)
    thr = _kth_smallest(flat, n - k + 1 if largest else k)
    mask = flat > thr if largest else flat < thr
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:  # fill from the entries equal to the threshold, in index order
        equal = (flat == thr).nonzero().squeeze(1)[:missing]
        mask[equal] = True
    return mask.reshape(a.shape)


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """Keep the k = max(1, ⌊density·N⌋) entries of largest |x| (TIES' "trim" step, Yadav et al. 2023)."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    return largest_mask(x.abs(), max(1, int(density * x.numel())))


def outlier_magnitude_mask(x: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the ⌊γ·N⌋ largest |x| and then the smallest, keeping ⌊density·N⌋ (Model Breadcrumbs, Davari &
    Belilovsky 2023). When γ and density together exceed N, fewer outliers are dropped so the density holds."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    n = x.numel()
    keep = int(density * n)
    n_bottom = max(0, n - keep - int(gamma * n))
    n_top = n - n_bottom - keep
    a = x.abs()
    return ~(smallest_mask(a, n_bottom) | largest_mask(a, n_top))


def bernoulli_mask(shape: torch.Size | tuple[int, ...], p: float | Tensor, generator: torch.Generator) -> Tensor:
    """Keep each entry independently with probability p (a scalar or a tensor of shape ``shape``)."""
    return torch.rand(shape, generator=generator) < p


def rank_keep_probability(x: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune probabilities (Deep et al. 2024): within each row, pᵢ = density − ε + 2ε·rᵢ, rᵢ the rank of
    |xᵢ| scaled to [0, 1] (smallest 0, largest 1). Rows are dim 0 after viewing x as 2-D (a 1-D x is one row).

    Ranks need an order within each row, so rows are sorted (in chunks of rows); the tensor as a whole is not.
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.empty(rows.shape, dtype=torch.float32)
    step = max(1, _ROW_CHUNK // max(n, 1))
    positions = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)  # rank → [0, 1]
    for start in range(0, rows.shape[0], step):
        order = rows[start:start + step].abs().argsort(dim=1, stable=True)
        ranks[start:start + step].scatter_(1, order, positions.expand(order.shape[0], n))
    return ((density - epsilon) + 2 * epsilon * ranks).reshape(x.shape)


def rescale_(delta: Tensor, mask: Tensor, mode: str | None, p: float | Tensor | None = None,
             eps: float = 1e-7) -> Tensor:
    """Apply a mask to ``delta`` in place and restore the scale of what was dropped; returns ``delta``.

    - ``None``: δ ⊙ m.
    - ``"1/p"`` (the DARE paper, Yu et al. 2024; DELLA per element): δ ⊙ m / p, unbiased per entry.
    - ``"l1"`` (mergekit): δ ⊙ m · ‖δ‖₁ / ‖δ ⊙ m‖₁, left unscaled when either norm is below ``eps``.
    """
    if mode not in (None, "1/p", "l1"):
        raise ValueError(f"unknown rescale mode {mode!r}")
    before = delta.abs().sum() if mode == "l1" else None
    delta.mul_(mask)
    if mode == "1/p":
        delta.div_(p)
    elif mode == "l1":
        after = delta.abs().sum()
        if before >= eps and after >= eps:
            delta.mul_(before / after)
    return delta
