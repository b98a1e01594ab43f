"""Merges that choose, entry by entry, which task vectors contribute: SCE, RAM and RAM+, NearSwap, Arcee Fusion.
Pure functions on float32 tensors, which know nothing about files.

Notation as in ``methods``: θ_b the base tensor, θᵢ the models' tensors, δᵢ = θᵢ − θ_b their task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def sce(base: Tensor, tuned: Sequence[Tensor], select_topk: float = 1.0) -> Tensor:
    """SCE (Select, Calculate, Erase) — Wan et al. 2024, "FuseChat: knowledge fusion of chat models",
    arXiv:2408.07990; mergekit's ``sce``.

    Select: with k = ⌊select_topk · #{j: Var_i δᵢⱼ ≠ 0}⌋, keep the k entries of largest variance across the models
    (population variance; all when select_topk ≥ 1, none when ≤ 0). Calculate: ηᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) over
    the selected δ (1/N when that sum is below 1e−6). Erase: keep the entries whose sign equals sign(Σᵢ δᵢ) (≥ 0 → +;
    zeros never agree). θ = θ_b + Σᵢ ηᵢ mᵢ δᵢ / max(Σᵢ ηᵢ mᵢ, 1e−6).
    """
    deltas = torch.stack([t - base for t in tuned])  # (N, …)
    if select_topk < 1:
        deltas = deltas * _top_variance_mask(deltas, select_topk)
    sign = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    agree = (deltas.sign() == sign).to(deltas.dtype)
    energy = deltas.square().reshape(len(tuned), -1).mean(dim=1)
    total = float(energy.sum())
    eta = torch.full_like(energy, 1 / len(tuned)) if abs(total) < 1e-6 else energy / total
    eta = eta.view(-1, *([1] * (deltas.dim() - 1))) * agree
    return base + (deltas * eta).sum(dim=0) / eta.sum(dim=0).clamp(min=1e-6)


def _top_variance_mask(deltas: Tensor, density: float) -> Tensor:
    """1 at the ⌊density · #nonzero⌋ entries of largest variance across dim 0 (torch.topk's choice among ties)."""
    var = torch.var(deltas, dim=0, unbiased=False)
    mask = torch.zeros_like(var)
    k = int(int(torch.count_nonzero(var)) * density) if density > 0 else 0
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
    return mask


def ram(base: Tensor, tuned: Sequence[Tensor], epsilon: float = 1e-5) -> Tensor:
    """RAM (Reinforced Agent Merging) — arXiv:2601.13572; mergekit's ``ram``.

    An entry of δᵢ contributes when |δᵢⱼ| > ε; with cⱼ the number of contributors, an entry that one model changed
    takes that change and an entry several changed takes their mean: θ = θ_b + Σᵢ [|δᵢ| > ε]·δᵢ / max(c, 1).
    """
    deltas, active, count = _contributions(base, tuned, epsilon)
    return base + (deltas * active / count.clamp(min=1)).sum(dim=0)


def ramplus_tl(
    base: Tensor, tuned: Sequence[Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> Tensor:
    """RAM+ (tensor-local) — arXiv:2601.13572; mergekit's ``ramplus_tl``: RAM with each model's unique changes
    amplified by how much of its change is shared.

    With ρᵢ = #{j: model i and another changed j} / max(#{j: only model i changed j}, ε) and
    λᵢ = 1 + r·clamp(ρᵢ, 0, α): θ = θ_b + Σᵢ aᵢ δᵢ·([c = 1]·λᵢ + [c > 1]/c), aᵢ = [|δᵢ| > ε].
    """
    deltas, active, count = _contributions(base, tuned, epsilon)
    unique, shared = count == 1, count > 1
    n = len(tuned)
    flat = active.reshape(n, -1)
    rho = (flat & shared.reshape(1, -1)).sum(dim=1) / (flat & unique.reshape(1, -1)).sum(dim=1).clamp(min=epsilon)
    lam = (1 + r * rho.clamp(min=0, max=alpha)).view(-1, *([1] * base.dim()))
    merged = deltas * active * (unique * lam + shared / count.clamp(min=1))
    return base + merged.sum(dim=0)


def _contributions(base: Tensor, tuned: Sequence[Tensor], epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """δ stacked (N, …), the mask |δ| > ε, and the per-entry number of contributing models (1, …)."""
    deltas = torch.stack([t - base for t in tuned])
    active = deltas.abs() > epsilon
    return deltas, active, active.sum(dim=0, keepdim=True)


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """NearSwap — alchemonaut 2024 (QuartetAnemoi); mergekit's ``nearswap``: take the other model's value where it
    is near the base's. w = clamp(t / max(|θ_b − θ₁|, 1e−6), 0, 1), θ = w·θ₁ + (1 − w)·θ_b."""
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def arcee_fusion(base: Tensor, other: Tensor) -> Tensor:
    """Arcee Fusion — Arcee AI 2025; mergekit's ``arcee_fusion``: keep the other model's changes only where they
    matter most.

    Importance sⱼ = |δⱼ| · KL(softmax(θ₁) ‖ softmax(θ_b)) (softmax and KL along the last dim, + 1e−8 to each
    probability); the threshold is median + 1.5·(q₃ − q₁) of s, a quantile q being the ⌊q·(n−1)⌋-th smallest value
    (exact here; mergekit estimates it from 10⁶ draws when the tensor is larger); θ = θ_b + δ·[s ≥ threshold].
    """
    delta = other - base
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = delta.abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    q1, median, q3 = (_quantile(flat, f) for f in (0.25, 0.5, 0.75))
    return base + delta * (importance >= median + 1.5 * (q3 - q1))


def _quantile(flat: Tensor, fraction: float) -> Tensor:
    """The ⌊fraction·(n−1)⌋-th smallest value (0-based) of a 1-D tensor, by selection rather than a sort."""
    index = int(torch.tensor(fraction) * (flat.numel() - 1))
    return torch.kthvalue(flat, index + 1).values
