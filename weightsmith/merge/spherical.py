"""Merges on the hypersphere: each tensor is a direction ‖θ‖⁻¹θ and a norm ‖θ‖, the directions are averaged along
the sphere and the norms linearly. Pure functions on tensors, which know nothing about files.

Inputs come in any float dtype (as stored) and are worked a block of rows at a time in float32, rounding once to
``out_dtype``: the whole-tensor quantities (norms, dot products) are sums over the blocks, and the scratch is one or
two float32 tensors of the input's size (the mean direction, the tangent), never a stack of every model.

Notation as in ``methods``: θ_b the base tensor, θᵢ the models' tensors, wᵢ their weights; u·v the dot product of
the flattened tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from weightsmith.merge.methods import _as_rows, _row_blocks


def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Barycentric SLERP of several tensors (of their task vectors θᵢ − θ_b when a base is given) — Goddard 2025,
    "Multi-SLERP"; mergekit's ``multislerp``.

    With wᵢ normalised to sum to 1 (``normalize_weights``), uᵢ = xᵢ/(‖xᵢ‖ + eps), m = Σwᵢuᵢ/‖Σwᵢuᵢ‖ (the weighted
    mean direction), the tangent vector τ = Σwᵢ(uᵢ − (uᵢ·m)m) at m is mapped back to the sphere by the exponential
    map, e = m cos‖τ‖' + τ sin‖τ‖'/‖τ‖' with ‖τ‖' = ‖τ‖ + eps, and scaled by the mean norm:
    θ = (Σwᵢ‖xᵢ‖)·e (+ θ_b). One tensor is returned as it is. If ‖Σwᵢuᵢ‖ < eps (antipodal inputs) two tensors fall
    back to Σwᵢxᵢ; more raise ValueError.

    >>> multislerp([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1.0, 1.0]).tolist()  # doctest: +SKIP
    [0.7071..., 0.7071...]
    """
    if len(tensors) == 1:
        return tensors[0].to(out_dtype, copy=True)
    xs = _Vectors(tensors, base)
    w = torch.tensor(list(weights), dtype=torch.float32)
    if normalize_weights:
        w = w / w.sum()
    norms = xs.norms()
    mean = torch.empty(xs.rows.shape, dtype=torch.float32)  # Σ wᵢuᵢ, then m
    for rows, x in xs:
        mean[rows] = _sum([xi / (n + eps) * wi for xi, n, wi in zip(x, norms, w)])
    mean_norm = _norm(mean)
    out, o2 = xs.output(out_dtype)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted mean direction is zero (antipodal inputs with balanced weights)")
        for rows, x in xs:
            o2[rows] = xs.plus_base(rows, x[0] * w[0] + x[1] * w[1])
        return out
    mean /= mean_norm
    dots = [0.0] * len(tensors)  # uᵢ·m
    for rows, x in xs:
        for i, (xi, n) in enumerate(zip(x, norms)):
            dots[i] += float(torch.dot((xi / (n + eps)).reshape(-1), mean[rows].reshape(-1)))

    def tangent(rows: slice, x: list[Tensor]) -> Tensor:
        return _sum([(xi / (n + eps) - d * mean[rows]) * wi for xi, n, d, wi in zip(x, norms, dots, w)])

    length = torch.tensor(math.sqrt(sum(_norm(tangent(rows, x)) ** 2 for rows, x in xs)), dtype=torch.float32) + eps
    scale = (torch.stack(norms) * w).sum()
    for rows, x in xs:
        direction = mean[rows] * torch.cos(length) + tangent(rows, x) * (torch.sin(length) / length)
        o2[rows] = xs.plus_base(rows, direction * scale)
    return out


def karcher(
    tensors: Sequence[Tensor], max_iter: int = 10, tol: float = 1e-5, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """The Karcher (Riemannian, Fréchet) mean of the tensors' directions on the unit sphere, scaled by their mean
    norm — Karcher 1977, "Riemannian center of mass and mollifier smoothing"; mergekit's ``karcher`` (equal weights).

    With uᵢ = θᵢ/‖θᵢ‖ over the tensors whose norm exceeds ``tol`` (weights αᵢ = 1/N renormalised over them), start
    from m = Σαᵢuᵢ/‖Σαᵢuᵢ‖ (u₁ when that norm is below ``tol``) and repeat at most ``max_iter`` times: the tangent
    τ = Σαᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ·m) with cos θᵢ = m·uᵢ (terms with θᵢ < tol skipped); stop when ‖τ‖ < tol, else
    m ← normalise(cos‖τ‖·m + sin‖τ‖·τ/‖τ‖). θ = (Σᵢ ‖θᵢ‖/N)·m; all-zero inputs give zeros.
    """
    if len(tensors) == 1:
        return tensors[0].to(out_dtype, copy=True)
    n = len(tensors)
    xs = _Vectors(tensors)
    norms = xs.norms()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=out_dtype)
    weights = [(1.0 / n) / sum(1.0 / n for _ in valid)] * len(valid)
    units = _Vectors([tensors[i] for i in valid], scales=[norms[i] for i in valid])  # uᵢ block by block
    mean = torch.empty(xs.rows.shape, dtype=torch.float32)
    for rows, u in units:
        mean[rows] = 0.0
        for a, ui in zip(weights, u):
            mean[rows] += a * ui
    mean_norm = _norm(mean)
    if float(mean_norm) < tol:
        for rows, u in units:
            mean[rows] = u[0]
    else:
        mean /= mean_norm
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        if not _karcher_step(units, weights, mean, tangent, tol):
            break
    scale = sum((1.0 / n) * norm for norm in norms)
    out, o2 = xs.output(out_dtype)
    for rows, _ in units.spans():
        o2[rows] = scale * mean[rows]
    return out


def _karcher_step(units: _Vectors, weights: list[float], mean: Tensor, tangent: Tensor, tol: float) -> bool:
    """One Karcher iteration, updating ``mean`` in place (``tangent`` is scratch); False once converged."""
    dots = [torch.zeros((), dtype=torch.float64) for _ in weights]
    for rows, u in units:
        for i, ui in enumerate(u):
            dots[i] += torch.dot(mean[rows].reshape(-1), ui.reshape(-1)).double()
    cosines = [torch.clamp(d.float(), -1.0, 1.0) for d in dots]
    thetas = [torch.arccos(c) for c in cosines]
    terms = [(a * (th / torch.sin(th)), c) for a, th, c in zip(weights, thetas, cosines)]
    for rows, u in units:
        tangent[rows] = 0.0
        for (coef, c), th, ui in zip(terms, thetas, u):
            if float(th) >= tol:
                tangent[rows] += coef * (ui - c * mean[rows])
    length = _norm(tangent)
    if float(length) < tol:
        return False
    for rows, _ in units.spans():  # block by block: no whole-tensor temporaries
        mean[rows] = torch.cos(length) * mean[rows] + torch.sin(length) * (tangent[rows] / length)
    unit_norm = _norm(mean)
    if float(unit_norm) > tol:
        mean /= unit_norm
    return True


class _Vectors:
    """Tensors as 2-D row views, given block by block in float32: θᵢ (− θ_b when a base is given; ÷ sᵢ when
    ``scales`` are given)."""

    def __init__(self, tensors: Sequence[Tensor], base: Tensor | None = None, scales: Sequence[Tensor] | None = None):
        self.shape = tensors[0].shape
        self.rows = _as_rows(tensors[0])
        self.tensors = [t.reshape(self.rows.shape) for t in tensors]
        self.base = base.reshape(self.rows.shape) if base is not None else None
        self.scales = scales

    def spans(self) -> Iterator[tuple[slice, None]]:
        return ((slice(s, e), None) for s, e in _row_blocks(self.rows))

    def __iter__(self) -> Iterator[tuple[slice, list[Tensor]]]:
        for rows, _ in self.spans():
            b = self.base[rows].float() if self.base is not None else None
            xs = [t[rows].to(torch.float32, copy=True) for t in self.tensors]  # fresh: callers may write
            if b is not None:
                xs = [x.sub_(b) for x in xs]
            if self.scales is not None:
                xs = [x / s for x, s in zip(xs, self.scales)]
            yield rows, xs

    def norms(self) -> list[Tensor]:
        """‖xᵢ‖ of each whole (flattened) tensor, float32 (summed over the blocks in float64)."""
        squares = [0.0] * len(self.tensors)
        for _, xs in self:
            for i, x in enumerate(xs):
                squares[i] += float(torch.dot(x.reshape(-1), x.reshape(-1)))
        return [torch.tensor(math.sqrt(s), dtype=torch.float32) for s in squares]

    def plus_base(self, rows: slice, x: Tensor) -> Tensor:
        return x + self.base[rows].float() if self.base is not None else x

    def output(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        out = torch.empty(self.shape, dtype=dtype)
        return out, out.view(self.rows.shape)


def _norm(t: Tensor) -> Tensor:
    """‖t‖ of the flattened tensor (float32)."""
    return torch.linalg.vector_norm(t)


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """Σ of same-shaped tensors, in order, into a new tensor."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total
