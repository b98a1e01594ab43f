"""Merges on the hypersphere: each tensor is a direction ‖θ‖⁻¹θ and a norm ‖θ‖, the directions are averaged along
the sphere and the norms linearly. Pure functions on float32 tensors, which know nothing about files.

Notation as in ``methods``: θ_b the base tensor, θᵢ the models' tensors, wᵢ their weights; u·v the dot product of
the flattened tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
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
        return tensors[0].clone()
    shape = tensors[0].shape
    xs = torch.stack([t.reshape(-1) - base.reshape(-1) if base is not None else t.reshape(-1) for t in tensors])
    w = torch.tensor(list(weights), dtype=xs.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = xs.norm(dim=-1, keepdim=True)  # (n, 1)
    units = xs / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted mean direction is zero (antipodal inputs with balanced weights)")
        out = (xs[0] * w[0] + xs[1] * w[1]).view(shape)
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    length = tangent.norm() + eps
    direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (direction * (norms.squeeze(-1) * w).sum()).view(shape)
    return out + base if base is not None else out


def karcher(tensors: Sequence[Tensor], max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher (Riemannian, Fréchet) mean of the tensors' directions on the unit sphere, scaled by their mean
    norm — Karcher 1977, "Riemannian center of mass and mollifier smoothing"; mergekit's ``karcher`` (equal weights).

    With uᵢ = θᵢ/‖θᵢ‖ over the tensors whose norm exceeds ``tol`` (weights αᵢ = 1/N renormalised over them), start
    from m = Σαᵢuᵢ/‖Σαᵢuᵢ‖ (u₁ when that norm is below ``tol``) and repeat at most ``max_iter`` times: the tangent
    τ = Σαᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ·m) with cos θᵢ = m·uᵢ (terms with θᵢ < tol skipped); stop when ‖τ‖ < tol, else
    m ← normalise(cos‖τ‖·m + sin‖τ‖·τ/‖τ‖). θ = (Σᵢ ‖θᵢ‖/N)·m; all-zero inputs give zeros.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    n = len(tensors)
    alphas = [1.0 / n] * n
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [(tensors[i] / norms[i]).reshape(-1) for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, units):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        length = torch.linalg.vector_norm(tangent)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(a * float(nrm) for a, nrm in zip(alphas, norms))
    return (mean * scale).view(tensors[0].shape)
