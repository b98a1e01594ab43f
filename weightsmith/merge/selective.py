"""Merges that choose, entry by entry, which task vectors contribute: SCE, RAM and RAM+, NearSwap, Arcee Fusion.
Pure functions on tensors, which know nothing about files.

Inputs come in any float dtype (as stored) and are worked a block of rows at a time in float32, rounding once to
``out_dtype``. The scratch is a few blocks, plus SCE's variances (one float32 tensor): a whole-tensor statistic
(SCE's variance threshold, Arcee Fusion's quantiles) is found by passes over the blocks and selection, never from a
stack of every model's task vector.

Notation as in ``methods``: θ_b the base tensor, θᵢ the models' tensors, δᵢ = θᵢ − θ_b their task vectors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from weightsmith import sparsify as sp
from weightsmith.merge.methods import _as_rows, _delta, _row_blocks


class _Blocks:
    """The base and the models as 2-D row views, and δᵢ block by block (float32, fresh tensors)."""

    def __init__(self, base: Tensor, tuned: Sequence[Tensor], rows: Tensor | None = None):
        self.shape = base.shape
        self.base = _as_rows(base) if rows is None else rows
        self.tuned = [t.reshape(self.base.shape) for t in tuned]
        self.spans = _row_blocks(self.base)

    def __iter__(self) -> Iterator[tuple[slice, Tensor, list[Tensor]]]:
        """(rows, θ_b block, [δᵢ block]) for each block of rows."""
        for s, e in self.spans:
            b = self.base[s:e].float()
            # up-cast, then subtract: a mixed-dtype subtraction is several times slower on CPU
            yield slice(s, e), b, [t[s:e].to(torch.float32, copy=True).sub_(b) for t in self.tuned]

    def output(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """An empty output of the input's shape and its 2-D row view."""
        out = torch.empty(self.shape, dtype=dtype)
        return out, out.view(self.base.shape)


def sce(
    base: Tensor, tuned: Sequence[Tensor], select_topk: float = 1.0, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """SCE (Select, Calculate, Erase) — Wan et al. 2024, "FuseChat: knowledge fusion of chat models",
    arXiv:2408.07990; mergekit's ``sce``.

    Select: with k = ⌊select_topk · #{j: Var_i δᵢⱼ ≠ 0}⌋, keep the k entries of largest variance across the models
    (population variance; all when select_topk ≥ 1, none when ≤ 0). Calculate: ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) over
    the selected δ (1/N when that sum is below 1e−6). Erase: keep the entries whose sign equals sign(Σᵢ δᵢ) (≥ 0 → +;
    zeros never agree). θ = θ_b + Σᵢ ηᵢ mᵢ δᵢ / max(Σᵢ ηᵢ mᵢ, 1e−6).

    Passes over the blocks: when selecting, the variances (one float32 tensor) and the selection of their threshold
    (``sparsify.count_cut``; among variances equal at it the lower flat index is kept); then the energies; then the
    output.
    """
    blocks, n = _Blocks(base, tuned), len(tuned)
    select = _top_variance(blocks, select_topk) if select_topk < 1 else None

    def selected(keep: Callable[[slice], Tensor] | None, rows: slice, deltas: list[Tensor]) -> list[Tensor]:
        if keep is None:
            return deltas
        mask = keep(rows).to(torch.float32)
        return [d.mul_(mask) for d in deltas]

    sums, keep = [0.0] * n, select() if select else None  # Σ δᵢ² of the selected entries (float64 over the blocks)
    for rows, _, deltas in blocks:
        for i, d in enumerate(selected(keep, rows, deltas)):
            sums[i] += float(torch.dot(d.reshape(-1), d.reshape(-1)))
    energy = torch.tensor([s / max(base.numel(), 1) for s in sums], dtype=torch.float32)
    total = float(energy.sum())
    eta = torch.full_like(energy, 1 / n) if abs(total) < 1e-6 else energy / total
    out, o2 = blocks.output(out_dtype)
    keep = select() if select else None
    for rows, b, deltas in blocks:
        deltas = selected(keep, rows, deltas)
        sign = (_sum(deltas) >= 0).to(torch.float32) * 2 - 1  # the elected sign (±1), ties to +
        erased = [eta[i] * (d.sign() == sign) for i, d in enumerate(deltas)]  # ηᵢ where δᵢ agrees, else 0
        merged = _sum([d * w for d, w in zip(deltas, erased)])
        o2[rows] = b + merged / _sum(erased).clamp(min=1e-6)
    return out


def _top_variance(blocks: _Blocks, density: float) -> Callable[[], Callable[[slice], Tensor]]:
    """A fresh pass (called once per pass over the blocks, in order): rows → the bool mask of the
    ⌊density · #nonzero⌋ entries of largest variance across the models in those rows. The variances are one float32
    tensor of the input's size, computed block by block; the threshold is found by selection
    (``sparsify.count_cut``), and among variances equal at it the lower flat index is kept (the module's tie rule)."""
    var = torch.empty(blocks.base.shape, dtype=torch.float32)
    for rows, _, deltas in blocks:
        var[rows] = _variance(deltas)
    flat = var.view(-1)
    k = int(int(torch.count_nonzero(var)) * density) if density > 0 else 0
    cut = sp.count_cut(lambda: (var[s:e] for s, e in blocks.spans), lambda step: flat[::step], flat.numel(), k, True)

    def fresh() -> Callable[[slice], Tensor]:
        c = copy.copy(cut)  # a pass counts the ties it takes
        return lambda rows: c.mask(var[rows])

    return fresh


def _variance(deltas: list[Tensor]) -> Tensor:
    """Population variance across the models, entry by entry: Σᵢ (δᵢ − δ̄)² / N, as elementwise operations (a
    reduction over dim 0 of a stack is several times slower)."""
    mean = _sum(deltas).div_(len(deltas))
    total = torch.zeros_like(mean)
    for d in deltas:
        total.add_(torch.sub(d, mean).square_())
    return total.div_(len(deltas))


def ram(base: Tensor, tuned: Sequence[Tensor], epsilon: float = 1e-5, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """RAM (Reinforced Agent Merging) — arXiv:2601.13572; mergekit's ``ram``.

    An entry of δᵢ contributes when |δᵢⱼ| > ε; with cⱼ the number of contributors, an entry that one model changed
    takes that change and an entry several changed takes their mean: θ = θ_b + Σᵢ [|δᵢ| > ε]·δᵢ / max(c, 1).
    """
    return _ram(_Blocks(base, tuned), [1.0] * len(tuned), epsilon, out_dtype)


def ramplus_tl(
    base: Tensor,
    tuned: Sequence[Tensor],
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """RAM+ (tensor-local) — arXiv:2601.13572; mergekit's ``ramplus_tl``: RAM with each model's unique changes
    amplified by how much of its change is shared.

    With ρᵢ = #{j: model i and another changed j} / max(#{j: only model i changed j}, ε) and
    λᵢ = 1 + r·clamp(ρᵢ, 0, α): θ = θ_b + Σᵢ aᵢ δᵢ·([c = 1]·λᵢ + [c > 1]/c), aᵢ = [|δᵢ| > ε].
    Two passes over the blocks: the counts, then the output.
    """
    blocks, n = _Blocks(base, tuned), len(tuned)
    shared, unique = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    for _, _, deltas in blocks:
        active, count = _active(deltas, epsilon)
        for i, a in enumerate(active):
            shared[i] += int(torch.count_nonzero(a & (count > 1)))
            unique[i] += int(torch.count_nonzero(a & (count == 1)))
    rho = shared / unique.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return _ram(blocks, [lam[i] for i in range(n)], epsilon, out_dtype)


def _ram(blocks: _Blocks, lam: Sequence[float | Tensor], epsilon: float, out_dtype: torch.dtype) -> Tensor:
    """θ_b + Σᵢ (aᵢδᵢ·λᵢ where one model changed the entry, aᵢδᵢ / c where several did), block by block."""
    out, o2 = blocks.output(out_dtype)
    for rows, b, deltas in blocks:
        active, count = _active(deltas, epsilon)
        unique, divisor = count == 1, count.clamp(min=1)
        terms = []
        for d, a, scale in zip(deltas, active, lam):
            kept = d.mul_(a)
            terms.append(torch.where(unique, kept * scale, kept / divisor))
        o2[rows] = b + _sum(terms)
    return out


def _active(deltas: list[Tensor], epsilon: float) -> tuple[list[Tensor], Tensor]:
    """The masks |δᵢ| > ε of one block and the number of models changing each entry."""
    active = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=torch.int64)
    for a in active:
        count += a
    return active, count


def nearswap(base: Tensor, other: Tensor, t: float, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """NearSwap — alchemonaut 2024 (QuartetAnemoi); mergekit's ``nearswap``: take the other model's value where it
    is near the base's. w = clamp(t / max(|θ_b − θ₁|, 1e−6), 0, 1), θ = w·θ₁ + (1 − w)·θ_b."""
    blocks = _Blocks(base, [other])
    out, o2 = blocks.output(out_dtype)
    for rows, b, (delta,) in blocks:
        weight = (t / delta.abs_().clamp(min=1e-6)).clamp(min=0, max=1)
        o2[rows] = weight * blocks.tuned[0][rows].float() + (1 - weight) * b
    return out


def arcee_fusion(base: Tensor, other: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Arcee Fusion — Arcee AI 2025; mergekit's ``arcee_fusion``: keep the other model's changes only where they
    matter most.

    Importance sⱼ = |δⱼ| · KL(softmax(θ₁) ‖ softmax(θ_b)) (softmax and KL along the last dim, + 1e−8 to each
    probability); the threshold is median + 1.5·(q₃ − q₁) of s, a quantile q being the ⌊q·(n−1)⌋-th smallest value
    (exact here; mergekit estimates it from 10⁶ draws when the tensor is larger); θ = θ_b + δ·[s ≥ threshold].
    Worked over blocks of rows along the last dim: one pass for the rows' KL, one per quantile (the importances
    recomputed block by block, never held whole), one for the output.
    """
    last = base.reshape(-1, base.shape[-1]) if base.dim() > 0 else base.reshape(1, 1)
    blocks = _Blocks(base, [other], rows=last)
    kl = torch.empty(last.shape[0], 1, dtype=torch.float32)  # KL(p ‖ q) of each row: (rows, 1)
    for rows, b, _ in blocks:
        p = torch.softmax(blocks.tuned[0][rows].float(), dim=-1) + 1e-8
        q = torch.softmax(b, dim=-1) + 1e-8
        kl[rows] = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)

    def importances() -> Iterator[Tensor]:
        for rows, _, (delta,) in blocks:
            yield delta.abs_() * kl[rows]

    def strided(step: int) -> Tensor:
        flat_b, flat_o = blocks.base.reshape(-1), blocks.tuned[0].reshape(-1)
        where = torch.arange(0, flat_b.numel(), step) // last.shape[1]
        return _delta(flat_o[::step], flat_b[::step].float()).abs_() * kl[where, 0]

    q1, median, q3 = (_quantile(importances, strided, base.numel(), f) for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    out, o2 = blocks.output(out_dtype)
    for (rows, b, (delta,)), importance in zip(blocks, importances()):
        o2[rows] = b + delta * (importance >= threshold)
    return out


def _quantile(chunks: Callable[[], Iterator[Tensor]], strided: Callable[[int], Tensor], n: int, fraction: float):
    """The ⌊fraction·(n−1)⌋-th smallest value (0-based) of the values ``chunks()`` yields, by selection
    (``sparsify.count_cut``) rather than a sort, as a float32 scalar tensor."""
    rank = int(torch.tensor(fraction) * (n - 1)) + 1
    if rank >= n:  # the largest
        return torch.stack([c.max() for c in chunks()]).max()
    return torch.tensor(sp.count_cut(chunks, strided, n, rank, largest=False).threshold, dtype=torch.float32)


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """Σ of same-shaped tensors, in order, into a new tensor."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total
