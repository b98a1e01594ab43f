"""Masks that keep part of a tensor: exactly k by score (``select_mask``/``select_indices``; for chunked values
``count_cut`` with ``magnitude_count`` or, without outliers, ``outlier_counts``), at random (``bernoulli_mask``), by
magnitude rank (``rank_keep_probability``).

Shared by the task-vector merges (TIES, DARE, breadcrumbs, DELLA), which apply them chunk by chunk, and by pruning
(magnitude, Wanda, N:M), which drops what it selects. Magnitude masks find their threshold by selection (a sampled
bracket, then ``kthvalue`` on the few candidates inside it), never by sorting the tensor: a full argsort of a large
tensor is what makes other TIES implementations slow. The values are read through a callable that yields them in
chunks, so a threshold over |θᵢ − θ_b| never needs that difference in memory.

One tie rule everywhere: a selection takes exactly the requested count, and among values equal at the cut the lower
(flat, or along ``dim``) index is selected first — kept by TIES, dropped by pruning.

>>> select_mask(torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0]), 2).tolist()
[True, True, False, False, False]
>>> select_indices(torch.ones(2, 4), 1, largest=False, dim=1).tolist()
[[0], [0]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

_SAMPLE = 1 << 16  # elements sampled to bracket a threshold
_UNIFORM_BITS = 24  # resolution of the uniform draws (as torch.rand's float32)


class Cut:
    """The k largest (or smallest) of a sequence of values: those strictly beyond ``threshold`` plus the first
    ``ties`` values equal to it. ``mask(chunk)`` is called on consecutive chunks, in order (it counts the ties)."""

    def __init__(self, threshold: float, ties: int, equal: int, largest: bool):
        self.threshold, self.ties, self.equal, self.largest = threshold, ties, equal, largest

    def mask(self, chunk: Tensor) -> Tensor:
        beyond = chunk > self.threshold if self.largest else chunk < self.threshold
        if self.ties == 0:
            return beyond
        equal = chunk == self.threshold
        if self.ties == self.equal:  # every equal value is in (the common case)
            return beyond | equal
        first = torch.cumsum(equal.reshape(-1), 0).reshape(chunk.shape) <= self.ties
        taken = equal & first
        self.ties -= int(torch.count_nonzero(taken))
        self.equal -= int(torch.count_nonzero(equal))
        return beyond | taken


def count_cut(
    chunks: Callable[[], Iterable[Tensor]], strided: Callable[[int], Tensor], n: int, k: int, largest: bool
) -> Cut:
    """The ``Cut`` keeping exactly ``k`` of the ``n`` values that ``chunks()`` yields (a fresh pass per call);
    ``strided(step)`` gives every step-th of those values, from the first.

    The k-th value is found by selection: a strided sample of about ``_SAMPLE`` values estimates the quantile, a
    margin of a few standard errors brackets it, and ``kthvalue`` runs on the values inside the bracket only. One
    pass counts and gathers them; a missed bracket (improbable) falls back to all values.
    """
    if k <= 0 or k >= n:  # nothing or everything: a threshold beyond every value
        edge = float("inf") if (k <= 0) == largest else float("-inf")
        return Cut(edge, 0, 0, largest)
    rank = n - k + 1 if largest else k  # 1-based, among the values in ascending order
    below = 0  # values known to lie below every candidate in ``values``
    if n <= 4 * _SAMPLE:
        values = torch.cat([c.reshape(-1) for c in chunks()])
    else:
        sample = strided(n // _SAMPLE)
        m = sample.numel()
        q = rank / n
        margin = 4.0 * (q * (1 - q) / m) ** 0.5 + 4.0 / m
        lo = torch.kthvalue(sample, max(1, int((q - margin) * m))).values if q - margin > 0 else None
        hi = torch.kthvalue(sample, min(m, int((q + margin) * m) + 1)).values if q + margin < 1 else None
        band = []
        for c in chunks():
            c = c.reshape(-1)
            inside = torch.ones_like(c, dtype=torch.bool) if lo is None else c >= lo
            if lo is not None:
                below += c.numel() - int(torch.count_nonzero(inside))
            if hi is not None:
                inside &= c <= hi
            band.append(c[inside])
        values = torch.cat(band)
        if not below < rank <= below + values.numel():  # the bracket missed: select among all values
            values, below = torch.cat([c.reshape(-1) for c in chunks()]), 0
    threshold = torch.kthvalue(values, rank - below).values
    less = below + int(torch.count_nonzero(values < threshold))
    equal = int(torch.count_nonzero(values == threshold))
    strict = n - less - equal if largest else less
    return Cut(float(threshold), k - strict, equal, largest)


def select_mask(scores: Tensor, k: int, *, largest: bool = True, dim: int | None = None) -> Tensor:
    """A bool mask selecting exactly the ``k`` largest (or smallest) of ``scores``, over the whole tensor or per
    slice along ``dim``; among values equal at the cut the lower index is selected first (the module's tie rule).

    Over the whole tensor the cut is found by selection (``count_cut``), along ``dim`` by a stable sort per slice.
    """
    if dim is None:
        flat = scores.reshape(-1)
        cut = count_cut(lambda: [flat], lambda step: flat[::step], flat.numel(), k, largest)
        return cut.mask(flat).reshape(scores.shape)
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    return mask.scatter_(dim, select_indices(scores, k, largest=largest, dim=dim), True)


def select_indices(scores: Tensor, k: int, *, largest: bool = True, dim: int | None = None) -> Tensor:
    """The indices ``select_mask`` selects: into the flattened ``scores`` (ascending), or per slice along ``dim``
    (shape of ``scores`` with ``k`` along ``dim``), as ``torch.topk(...).indices`` gives them but with the stated
    tie rule instead of an unspecified one."""
    if dim is None:
        return torch.nonzero(select_mask(scores, k, largest=largest).reshape(-1)).reshape(-1)
    order = torch.sort(scores, dim=dim, descending=largest, stable=True).indices  # equal values: lower index first
    return order.narrow(dim, 0, k)


def magnitude_count(n: int, density: float) -> int:
    """k = max(1, ⌊density·N⌋) entries of largest |x| are kept (TIES' "trim" step, Yadav et al. 2023); N for
    density ≥ 1, 0 for density ≤ 0."""
    return n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(bottom, top): how many of the smallest and of the largest |x| Model Breadcrumbs drops (Davari & Belilovsky
    2023) to keep ⌊density·N⌋ after dropping the ⌊γ·N⌋ largest. When γ and density together exceed N, fewer
    outliers are dropped so the density holds."""
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    return bottom, n - bottom - keep


def bernoulli_mask(generator: np.random.Generator, shape: torch.Size | tuple[int, ...], p: float | Tensor) -> Tensor:
    """Keep each entry independently with probability p (a scalar, or a float tensor of ``shape``): u < p.

    u = ⌊r/2⁸⌋·2⁻²⁴ for a uniform 32-bit r is uniform on [0, 1) at float32's resolution. The bits come from a numpy
    bit generator (PCG64, ``random_raw``: several times faster than torch.rand on CPU), and its stream continues
    across calls, so block-by-block draws equal one draw for the whole tensor.
    """
    n = math.prod(shape)
    raw = generator.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    if isinstance(p, Tensor):
        u = torch.from_numpy((raw >> 8).astype(np.float32)).mul_(2.0**-_UNIFORM_BITS)
        return u.reshape(shape) < p
    threshold = round(min(max(p, 0.0), 1.0) * (1 << _UNIFORM_BITS)) << 8  # ⌊r/2⁸⌋ < t  ⇔  r < t·2⁸
    return torch.from_numpy(np.less(raw, threshold)).reshape(shape)


def rank_keep_probability(x: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune probabilities (Deep et al. 2024): within each row, pᵢ = density − ε + 2ε·rᵢ, rᵢ the rank of
    |xᵢ| scaled to [0, 1] (smallest 0, largest 1; equal values ranked by position). Rows are dim 0 after viewing x
    as 2-D (a 1-D x is one row); the merge calls this on blocks of rows.

    The order comes from sorting one int64 key per entry, the float32 bits of |xᵢ| (which order like the values)
    above its column index: keys are unique, so any sort gives the stable order, and numpy's vectorised sort of
    integers is several times faster than an argsort.
    """
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    keys = rows.abs().float().contiguous().view(torch.int32).numpy().astype(np.int64)
    keys <<= 32
    keys |= np.arange(n, dtype=np.int64)
    keys.sort(axis=1)
    order = torch.from_numpy(keys & 0xFFFFFFFF)  # [rows, n]: the column holding each rank
    positions = torch.arange(n, dtype=torch.float32).div_(max(n - 1, 1))  # rank → [0, 1]
    ranks = torch.empty(rows.shape, dtype=torch.float32).scatter_(1, order, positions.expand(rows.shape[0], n))
    return ranks.mul_(2 * epsilon).add_(density - epsilon).reshape(x.shape)
