"""Merge methods: pure functions on tensors, which know nothing about files. They compute in float32; linear and the
task-vector family take inputs in any float dtype and work a block of rows at a time (see ``_BLOCK``), rounding
once to the dtype asked for.

Notation: θ_b the base tensor, θᵢ the fine-tuned tensors, δᵢ = θᵢ − θ_b their task vectors, wᵢ their weights.
The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA) is one computation parameterised by a
``FamilyRow`` of the method table (``table.METHODS[name].family``): a sparsifier × a sign consensus × a default
normalisation, as mergekit's generalized task arithmetic defines it; each named method below is that computation
with its row.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from weightsmith import sparsify as sp
from weightsmith.merge.table import CONSENSUS, EPSILON, GAMMA, METHODS, RESCALE_MODE, RESCALE_MODES, FamilyRow

_BLOCK = 1 << 18  # elements per block of rows: N × 1 MB of float32 scratch stays in the CPU cache


# ---------------------------------------------------------------------------------------------------------------
# Averaging and interpolation


def linear(
    tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """θ = Σᵢ wᵢ θᵢ, divided by Σᵢ wᵢ when ``normalize`` — Wortsman et al. 2022, "Model soups".

    Inputs in any float dtype, accumulated in float32 a block of rows at a time and rounded once to ``out_dtype``.

    >>> linear([torch.ones(2), torch.zeros(2)], [3.0, 1.0]).tolist()
    [0.75, 0.75]
    """
    rows = [_as_rows(t) for t in tensors]
    out = torch.empty(tensors[0].shape, dtype=out_dtype)
    o2 = out.view(rows[0].shape)
    total = sum(weights)
    scratch = torch.empty(0, dtype=torch.float32)
    for s, e in _row_blocks(rows[0]):
        acc = rows[0][s:e].to(torch.float32, copy=True).mul_(weights[0])  # w₀θ₀ rounded once, as 0 + w₀θ₀ would be
        for t, w in zip(rows[1:], weights[1:]):  # up-cast first: a mixed-dtype add runs a slower kernel
            acc.add_(scratch.resize_(t[s:e].shape).copy_(t[s:e]), alpha=w)
        if normalize:
            acc /= total
        o2[s:e] = acc
    return out


def slerp(
    a: Tensor,
    b: Tensor,
    t: float,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Spherical interpolation of the flattened tensors — Shoemake 1985; mergekit's ``slerp`` (t = 0 gives a).

    With â = a/‖a‖, b̂ = b/‖b‖, cos Ω = â·b̂ (clamped to [−1, 1]):
    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, the norms untouched (the coefficients multiply a and b, as
    mergekit does). Nearly colinear tensors (|cos Ω| > ``dot_threshold``) fall back to (1−t)·a + t·b.
    Norms below ``eps`` count as 1. Inputs in any float dtype, read twice a block of rows at a time (norms and dot
    product accumulated in float64, then the float32 combination rounded once to ``out_dtype``).
    """
    ra, rb = _as_rows(a), _as_rows(b)
    blocks = _row_blocks(ra)
    sq_a = sq_b = ab = 0.0
    for s, e in blocks:
        x, y = ra[s:e].double().reshape(-1), rb[s:e].double().reshape(-1)
        sq_a, sq_b, ab = sq_a + float(torch.dot(x, x)), sq_b + float(torch.dot(y, y)), ab + float(torch.dot(x, y))
    na, nb = math.sqrt(sq_a), math.sqrt(sq_b)
    na, nb = na if na > eps else 1.0, nb if nb > eps else 1.0
    dot = min(max(ab / (na * nb), -1.0), 1.0)
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        omega = math.acos(dot)
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    out = torch.empty(a.shape, dtype=out_dtype)
    o2 = out.view(ra.shape)
    scratch = torch.empty(0, dtype=torch.float32)
    for s, e in blocks:  # b up-cast into a scratch block first: a mixed-dtype add runs a slower kernel
        y = scratch.resize_(rb[s:e].shape).copy_(rb[s:e])
        o2[s:e] = ra[s:e].to(torch.float32, copy=True).mul_(ca).add_(y, alpha=cb)
    return out


def nuslerp(
    a: Tensor,
    b: Tensor,
    weights: Sequence[float],
    base: Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """SLERP with t = w_b/(w_a + w_b) (0.5 when the weights sum to 0), of the task vectors when a base is given:
    θ = θ_b + slerp(a − θ_b, b − θ_b, t) — mergekit's ``nuslerp``.

    Here slerp uses unit vectors û = u/max(‖u‖, 1e−7) to find Ω but combines the raw u:
    (sin((1−t)Ω)·a + sin(tΩ)·b)/sin Ω, and falls back to (1−t)a + tb where 1 − cos²Ω ≤ eps². ``flatten`` treats the
    tensor as one vector (the default); otherwise each row (``row_wise``: each column) is interpolated separately.
    """
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    u, v = (a - base, b - base) if base is not None else (a, b)
    shape = u.shape
    if flatten:
        u, v = u.reshape(-1), v.reshape(-1)
    elif row_wise:
        u, v = u.transpose(0, -1), v.transpose(0, -1)
    cos = (
        ((u / u.norm(dim=-1, keepdim=True).clamp(min=1e-7)) * (v / v.norm(dim=-1, keepdim=True).clamp(min=1e-7)))
        .sum(dim=-1, keepdim=True)
        .clamp(-1, 1)
    )
    colinear = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    mixed = (torch.sin((1 - t) * omega) * u + torch.sin(t * omega) * v) / torch.sin(omega)
    out = torch.where(colinear, (1 - t) * u + t * v, mixed)
    if not flatten and row_wise:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out + base if base is not None else out


def model_stock(base: Tensor, tuned: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """θ = t·mean(θᵢ) + (1−t)·θ_b with t = N·c / (1 + (N−1)·c), c the mean pairwise cosine of the task vectors —
    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models".

    Cosines use max(‖δᵢ‖‖δⱼ‖, 1e−6) and are clamped to [−1, 1]. Where 1 + (N−1)c is within 1e−6 of 0, t = 0 (the
    base is kept), as in mergekit. ``filter_wise`` computes c per row (dim 0) instead of over the whole tensor.
    """
    shape = base.shape
    if filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base.reshape(base.shape[0], -1)
        ws = [w.reshape(b.shape) for w in tuned]
    else:
        b = base.reshape(-1)
        ws = [w.reshape(-1) for w in tuned]
    deltas = [w - b for w in ws]
    cosines = []
    for i, da in enumerate(deltas):
        for db in deltas[i + 1 :]:
            norms = (da.norm(dim=-1) * db.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((da * db).sum(dim=-1) / norms).clamp(-1, 1))
    c = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    mean = torch.stack(ws).mean(dim=0) if n > 1 else ws[0]
    return (t * mean + (1 - t) * b).reshape(shape)


def passthrough(tensor: Tensor, scale: float | None = None) -> Tensor:
    """θ = s·θ₁ (θ₁ unchanged when no scale is given) — mergekit's ``passthrough`` for one model."""
    return tensor.clone() if scale is None else tensor * scale


# ---------------------------------------------------------------------------------------------------------------
# The task-vector family


@dataclass(frozen=True)
class FamilyStats:
    """What a task-vector merge did to one tensor (for the report)."""

    kept: float  # mean fraction of entries kept by the sparsifier, over the models
    conflict: float  # fraction of entries whose kept, weighted δᵢ disagree in sign (before the election)


def merge_task_vectors(
    row: FamilyRow,
    base: Tensor,
    tuned: Sequence[Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    lam: float = 1.0,
    normalize: bool | None = None,
    rescale: bool | None = None,
    rescale_mode: str = RESCALE_MODE,
    consensus: str | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, FamilyStats | None]:
    """θ = θ_b + λ · Σᵢ mᵢ ⊙ wᵢ·S(δᵢ) / D, the task-vector family (mergekit's generalized task arithmetic).

    S thins δᵢ (``row.sparsifier``; density dᵢ), rescaled by 1/p (the papers) or to δᵢ's L1 norm (mergekit) when
    ``rescale``. With a consensus, the elected sign is sign(Σᵢ wᵢS(δᵢ)) ("sum", TIES) or the majority of signs
    ("count"), ties going to +, and mᵢ keeps the entries of wᵢS(δᵢ) with that sign; otherwise mᵢ = 1. With
    ``normalize`` D = Σᵢ wᵢ·mᵢ per entry (1 where that is 0; with no consensus 1 where |Σwᵢ| < 1e−8), else D = 1.
    ``gammas`` (breadcrumbs) and ``epsilons`` (DELLA) are per model; random sparsifiers draw from a PCG64 stream
    per model seeded with ``seeds[i]``. Returns the result in ``out_dtype`` (rounded once) and, for rows that thin
    or elect, its stats.

    Streamed within the tensor: the inputs stay as stored (any float dtype, never modified); δᵢ is formed in
    float32 one block of rows at a time and thinned, weighted, elected and summed there, so the scratch is a few
    megabytes and each input is read from memory once, plus once per magnitude threshold (and once more with
    ``rescale_mode="l1"``, whose scale depends on the whole mask).
    """
    normalize = row.normalize if normalize is None else normalize
    rescale = row.rescale if rescale is None else rescale
    consensus = row.consensus if consensus is None else consensus
    mode = rescale_mode if rescale else None
    _check_family(row, mode, consensus)
    n = len(tuned)
    stream = _DeltaStream(base, tuned)
    densities = densities or [1.0] * n
    thinned = [row.sparsifier is not None and d < 1 for d in densities]
    cuts = [
        _magnitude_cuts(row.sparsifier, stream, i, densities[i], (gammas or [GAMMA] * n)[i]) if thinned[i] else []
        for i in range(n)
    ]

    def thinner(i: int) -> _Thin:
        if seeds is None and row.sparsifier in ("random", "rank_random"):
            raise ValueError(f"the {row.sparsifier} sparsifier needs one seed per model")
        seed = seeds[i] if seeds is not None else 0
        return _thinner(row.sparsifier, cuts[i], densities[i], (epsilons or [EPSILON] * n)[i], seed)

    factors = [float(w) for w in weights]  # what multiplies the kept δᵢ: wᵢ, and the L1 rescale when asked
    if mode == "l1":
        for i in (i for i in range(n) if thinned[i]):
            factors[i] *= _l1_rescale(stream, i, thinner(i))

    out = torch.empty(base.shape, dtype=out_dtype)
    o2 = out.view(stream.base.shape)
    thins = [thinner(i) if thinned[i] else None for i in range(n)]
    kept, conflicts = [0] * n, 0
    total_w = float(sum(weights))
    for s, e in stream.blocks:
        b = stream.base[s:e].float()
        if consensus is None and row.sparsifier is None:  # Σ wᵢδᵢ summed as each δᵢ comes: no block per model
            total = _weighted_deltas([t[s:e] for t in stream.tuned], b, factors)
        else:
            deltas = [_kept_delta(stream.tuned[i][s:e], b, factors[i], thins[i], mode, kept, i) for i in range(n)]
            if consensus is not None:
                total, opposed = _elect(deltas, weights, consensus, normalize, b)
            else:
                total, opposed = _summed(deltas)
            conflicts += opposed
        if consensus is None and normalize and abs(total_w) >= 1e-8:
            total /= total_w
        if lam != 1:
            total *= lam
        o2[s:e] = total.add_(b)
    plain = consensus is None and row.sparsifier is None  # nothing thinned or elected: no stats
    return out, None if plain else _family_stats(base.numel(), kept, thinned, conflicts)


def _check_family(row: FamilyRow, mode: str | None, consensus: str | None) -> None:
    """Refuse a rescale mode, consensus or sparsifier the family does not know."""
    if mode not in (None, *RESCALE_MODES):
        raise ValueError(f"unknown rescale mode {mode!r}")
    if consensus not in (None, *CONSENSUS):
        raise ValueError(f"unknown consensus {consensus!r}")
    if row.sparsifier not in (None, "magnitude", "outliers", "random", "rank_random"):
        raise ValueError(f"unknown sparsifier {row.sparsifier!r}")


def _family_stats(numel: int, kept: list[int], thinned: list[bool], conflicts: int) -> FamilyStats:
    """Mean fraction kept over the models (1 for a model not thinned) and the fraction of sign conflicts."""
    n = len(kept)
    kept_fraction = sum(kept[i] / max(numel, 1) if thinned[i] else 1.0 for i in range(n)) / max(n, 1)
    return FamilyStats(kept_fraction, conflicts / max(numel, 1))


# A sparsifier pass: δ block → (kept mask, keep probability: a number or a tensor of δ's shape)
_Thin = Callable[[Tensor], tuple[Tensor, "float | Tensor"]]


class _DeltaStream:
    """The inputs as 2-D row views and the row blocks they are worked in; δᵢ block by block, never whole."""

    def __init__(self, base: Tensor, tuned: Sequence[Tensor]):
        self.base_full, self.tuned_full = base, tuned
        self.base = _as_rows(base)
        self.tuned = [_as_rows(t) for t in tuned]
        self.blocks = _row_blocks(self.base)
        self.numel = base.numel()

    def deltas(self, i: int) -> Iterator[Tensor]:
        """δᵢ block by block (float32, fresh tensors)."""
        for s, e in self.blocks:
            yield _delta(self.tuned[i][s:e], self.base[s:e].float())

    def abs_deltas(self, i: int) -> Iterator[Tensor]:
        return (d.abs_() for d in self.deltas(i))

    def strided(self, i: int, step: int) -> Tensor:
        """Every step-th |δᵢ| of the flattened tensor, read straight from the inputs."""
        flat_b, flat_t = self.base_full.reshape(-1), self.tuned_full[i].reshape(-1)
        return _delta(flat_t[::step], flat_b[::step].float()).abs_()


def _magnitude_cuts(sparsifier: str | None, stream: _DeltaStream, i: int, density: float, gamma: float) -> list:
    """The thresholds of a magnitude sparsifier on |δᵢ|: the top k (TIES), or the band below the outliers
    (breadcrumbs: drop the smallest and the largest); none for the random sparsifiers."""
    chunks, sample, numel = (lambda: stream.abs_deltas(i)), (lambda step: stream.strided(i, step)), stream.numel
    if sparsifier == "magnitude":
        return [sp.count_cut(chunks, sample, numel, sp.magnitude_count(numel, density), largest=True)]
    if sparsifier == "outliers":
        bottom, top = sp.outlier_counts(numel, density, gamma)
        return [
            sp.count_cut(chunks, sample, numel, bottom, largest=False),
            sp.count_cut(chunks, sample, numel, top, largest=True),
        ]
    return []


def _thinner(sparsifier: str | None, cuts: list, density: float, epsilon: float, seed: int) -> _Thin:
    """A fresh pass of S for one model over the blocks in order: δ block → (kept mask, keep probability)."""
    if sparsifier in ("magnitude", "outliers"):
        fresh = [copy.copy(c) for c in cuts]  # a pass counts the ties it takes
        if len(fresh) == 1:
            return lambda delta: (fresh[0].mask(delta.abs()), density)
        return lambda delta: (~(fresh[0].mask(a := delta.abs()) | fresh[1].mask(a)), density)
    generator = np.random.Generator(np.random.PCG64(seed))  # a pass replays the same draws
    if sparsifier == "random":
        return lambda delta: (sp.bernoulli_mask(generator, delta.shape, density), density)

    def magprune(delta: Tensor) -> tuple[Tensor, Tensor]:
        p = sp.rank_keep_probability(delta, density, epsilon)
        return sp.bernoulli_mask(generator, delta.shape, p), p

    return magprune


def _l1_rescale(stream: _DeltaStream, i: int, thin: _Thin) -> float:
    """mergekit's rescale: ‖δᵢ‖₁ / ‖mask ⊙ δᵢ‖₁ (1 when either norm is below ``_L1_EPS``)."""
    before = after = 0.0
    for delta in stream.deltas(i):
        before += float(delta.abs().sum())
        after += float(delta.mul_(thin(delta)[0].view(torch.uint8)).abs().sum())
    return before / after if before >= _L1_EPS and after >= _L1_EPS else 1.0


def _delta(tuned: Tensor, base: Tensor) -> Tensor:
    """δ = θ − θ_b as a fresh tensor of the promoted dtype (float32 for a float32 ``base`` and bf16/fp16/fp32
    inputs): the stored block is up-cast first, then subtracted. The same values as one mixed-dtype subtraction,
    whose kernel is slower (task arithmetic of three bf16 blocks of 2¹⁸ elements: 0.83 ms this way, 1.2-1.6 ms
    mixed)."""
    return tuned.to(torch.promote_types(tuned.dtype, base.dtype), copy=True).sub_(base)


def _weighted_deltas(tuned: Sequence[Tensor], base: Tensor, factors: Sequence[float]) -> Tensor:
    """Σᵢ fᵢ·(θᵢ − θ_b) on one block, as a new float32 tensor: each δᵢ is added (scaled) as soon as it is formed,
    into one reused scratch block. Each fᵢ·δᵢ is rounded before it is added, as mergekit's weighted sum does (a fused
    ``add_(δ, alpha=f)`` rounds once less and moved 0.02% of a bf16 merge's entries by one unit)."""
    total = _delta(tuned[0], base).mul_(factors[0])
    scratch = torch.empty_like(total)
    for t, f in zip(tuned[1:], factors[1:]):
        total.add_(scratch.copy_(t).sub_(base).mul_(f))
    return total


def _kept_delta(
    tuned: Tensor, base: Tensor, factor: float, thin: _Thin | None, mode: str | None, kept: list[int], i: int
) -> Tensor:
    """One block of wᵢ·S(δᵢ) as its own contiguous float32 tensor (counting the kept entries into ``kept[i]``).

    Each model's block is its own tensor: reductions across models (dim 0 of a stack) are an order of magnitude
    slower than the same work as elementwise ops, model by model."""
    delta = _delta(tuned, base)
    scale = factor
    if thin is not None:
        mask, p = thin(delta)
        kept[i] += int(torch.count_nonzero(mask))
        delta.mul_(mask.view(torch.uint8))  # (a bool multiplies faster seen as bytes)
        if mode == "1/p" and isinstance(p, Tensor):
            delta.div_(p)
        elif mode == "1/p":
            scale /= float(p)
    return delta.mul_(scale)


def _elect(
    deltas: list[Tensor], weights: Sequence[float], consensus: str, normalize: bool, like: Tensor
) -> tuple[Tensor, int]:
    """TIES' sign election on one block: Σ of the δᵢ agreeing with the elected sign (÷ the sum of their weights
    when ``normalize``), and the count of entries where some kept δᵢ opposes that sign. Consumes ``deltas``."""
    votes = deltas if consensus == "sum" else [torch.sign(d) for d in deltas]
    sign = (_sum(votes) >= 0).view(torch.uint8).float().mul_(2).sub_(1)  # the elected sign (±1), ties to +
    total = torch.zeros_like(like)
    divisor = torch.zeros_like(like) if normalize else None
    opposed: Tensor | None = None
    for i, delta in enumerate(deltas):
        aligned = delta.mul_(sign)  # > 0 where δᵢ has the elected sign, < 0 where it opposes it
        against = aligned < 0
        opposed = against if opposed is None else opposed.logical_or_(against)
        if divisor is not None:
            divisor.add_((aligned > 0).view(torch.uint8), alpha=float(weights[i]))
        total.add_(aligned.clamp_min_(0))  # the agreeing entries, still multiplied by the sign
    total.mul_(sign)
    if divisor is not None:
        total.div_(divisor.add_((divisor == 0).view(torch.uint8)))  # D = 1 where nothing agrees
    return total, int(torch.count_nonzero(opposed)) if opposed is not None else 0


def _summed(deltas: Sequence[Tensor]) -> tuple[Tensor, int]:
    """Σᵢ of the kept, weighted δᵢ of one block and the count of entries where they disagree in sign."""
    return _sum(deltas), _disagreements(deltas)


def _disagreements(deltas: Sequence[Tensor]) -> int:
    """Entries where the kept, weighted δᵢ have both signs."""
    positive, negative = _any(d > 0 for d in deltas), _any(d < 0 for d in deltas)
    return int(torch.count_nonzero(positive.logical_and_(negative)))


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """Σ of same-shaped tensors, in order, into a new tensor."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total


def _any(masks) -> Tensor:
    """Elementwise OR of bool tensors."""
    masks = iter(masks)
    out = next(masks)
    for m in masks:
        out.logical_or_(m)
    return out


_L1_EPS = 1e-7  # below this an L1 norm is left unscaled (as mergekit does)


def _row_blocks(rows: Tensor) -> list[tuple[int, int]]:
    """[start, end) row ranges of about ``_BLOCK`` elements (at least one row) covering a 2-D view."""
    step = max(1, _BLOCK // max(1, rows.shape[1]))
    return [(s, min(s + step, rows.shape[0])) for s in range(0, rows.shape[0], step)]


def _as_rows(t: Tensor) -> Tensor:
    """A tensor as a 2-D view [rows, cols] (dim 0 are the rows; a 1-D or 0-D tensor is one row)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def _family(name: str) -> FamilyRow:
    row = METHODS[name].family
    if row is None:
        raise ValueError(f"{name} is not a task-vector method")
    return row


def task_arithmetic(base: Tensor, tuned: Sequence[Tensor], weights: Sequence[float], lam: float = 1.0) -> Tensor:
    """θ = θ_b + λ · Σᵢ wᵢ δᵢ — Ilharco et al. 2023, "Editing models with task arithmetic". A negative wᵢ removes
    a task."""
    return merge_task_vectors(_family("task_arithmetic"), base, tuned, weights, lam=lam)[0]


def ties(
    base: Tensor,
    tuned: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float = 1.0,
    consensus: str | None = None,
    normalize: bool | None = None,
) -> Tensor:
    """TIES-merging — Yadav et al. 2023: keep the top-dᵢ fraction of |δᵢ| (k = max(1, ⌊dᵢN⌋)), elect
    γ = sign(Σᵢ wᵢδ̃ᵢ) per entry, and average the agreeing entries: θ = θ_b + λ·Σᵢ[sign(wᵢδ̃ᵢ) = γ]wᵢδ̃ᵢ / Σᵢ[…]wᵢ.
    Weights multiply δ̃ᵢ before the election (as mergekit does; the paper has unit weights)."""
    return merge_task_vectors(
        _family("ties"), base, tuned, weights, densities=densities, lam=lam, consensus=consensus, normalize=normalize
    )[0]


def dare_linear(
    base: Tensor,
    tuned: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    lam: float = 1.0,
    rescale_mode: str = RESCALE_MODE,
) -> Tensor:
    """DARE — Yu et al. 2024, "Language models are Super Mario": drop each entry of δᵢ with probability 1 − dᵢ and
    rescale the survivors (by 1/dᵢ, the paper; or ``rescale_mode="l1"`` to δᵢ's L1 norm, mergekit), then
    θ = θ_b + λ·Σᵢ wᵢδ̃ᵢ."""
    return merge_task_vectors(
        _family("dare_linear"),
        base,
        tuned,
        weights,
        densities=densities,
        lam=lam,
        rescale_mode=rescale_mode,
        seeds=seeds,
    )[0]


def dare_ties(
    base: Tensor,
    tuned: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    lam: float = 1.0,
    rescale_mode: str = RESCALE_MODE,
) -> Tensor:
    """DARE's random drop and rescale (Yu et al. 2024) followed by TIES' sign election (Yadav et al. 2023), not
    normalised: θ = θ_b + λ·Σᵢ[sign(wᵢδ̃ᵢ) = γ]wᵢδ̃ᵢ."""
    return merge_task_vectors(
        _family("dare_ties"), base, tuned, weights, densities=densities, lam=lam, rescale_mode=rescale_mode, seeds=seeds
    )[0]


def breadcrumbs(
    base: Tensor,
    tuned: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gamma: float = GAMMA,
    lam: float = 1.0,
) -> Tensor:
    """Model Breadcrumbs — Davari & Belilovsky 2023: drop the ⌊γN⌋ largest |δᵢ| (outliers) and the smallest, keeping
    ⌊dᵢN⌋; θ = θ_b + λ·Σᵢ wᵢδ̃ᵢ."""
    return merge_task_vectors(
        _family("breadcrumbs"), base, tuned, weights, densities=densities, gammas=[gamma] * len(tuned), lam=lam
    )[0]


def della(
    base: Tensor,
    tuned: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    epsilon: float = EPSILON,
    lam: float = 1.0,
    rescale_mode: str = RESCALE_MODE,
) -> Tensor:
    """DELLA-merging — Deep et al. 2024: MagPrune keeps entry j of δᵢ with probability pⱼ = dᵢ − ε + 2ε·rⱼ (rⱼ its
    magnitude rank within the row, scaled to [0, 1]) and rescales survivors by 1/pⱼ (or to the L1 norm), then TIES'
    election and the normalised mean of agreeing entries, ×λ."""
    return merge_task_vectors(
        _family("della"),
        base,
        tuned,
        weights,
        densities=densities,
        epsilons=[epsilon] * len(tuned),
        lam=lam,
        rescale_mode=rescale_mode,
        seeds=seeds,
    )[0]
