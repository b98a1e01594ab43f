"""Pure tensor math of the PEFT adapter types other than plain LoRA. No files, no names: tensors in, tensors out.

Three update kinds cover every foldable type, each with one implementation in the row view ``[out, in]`` of
``math.py``:

- additive, W' = W + ΔW: AdaLoRA and VeRA are low-rank (their ΔW is handed to LoRA's fold as factors B·A), LoHa and
  LoKr are full-rank (ΔW built here, then added);
- scaling, W' = W ⊙ l (IA³: rows or columns);
- rotation, W' = W·Rᵀ with R block-diagonal orthogonal (OFT), or a product of permuted block-diagonal ones with a
  row scale (BOFT).

Formulas follow PEFT 0.21 (``peft/tuners/<type>/layer.py``), which is the reference the fold is tested against.
Everything is computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _acc(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


# -- additive, low rank: factors for LoRA's fold --------------------------------------------------------------------


def adalora_a(a: Tensor, e: Tensor) -> Tensor:
    """AdaLoRA (Zhang et al. 2023) as a LoRA A factor: ΔW = B·(A ⊙ E)·α/(ranknum + 1e-5), so A' = A ⊙ E, B' = B.

    ``a`` ``[r, in]``, ``e`` ``[r, 1]`` (the learned singular values). The scale α/(ranknum + 1e-5) is
    ``adalora_scaling``; ranknum is the rank the adapter was created with (``init_r``), kept when the saved rank
    pattern drops triplets (peft/tuners/adalora/layer.py ``get_delta_weight``).
    """
    return _acc(a) * _acc(e)


def adalora_scaling(alpha: float, ranknum: int) -> tuple[float, float]:
    """AdaLoRA's scale as (α, d): ΔW = (B·(A ⊙ E))·α / d, d = ranknum + 1e-5 rounded to float32 as PEFT holds
    ranknum in a float32 parameter; α ≤ 0 means α = ranknum (PEFT's ``scaling = lora_alpha if lora_alpha > 0 else
    float(r)``). PEFT multiplies by α and then divides by d, each step rounded; α/d is the one-factor scale."""
    denominator = float(torch.tensor(float(ranknum)) + 1e-5)
    return (alpha if alpha > 0 else float(ranknum)), denominator


def vera_factors(
    shared_a: Tensor, shared_b: Tensor, lambda_d: Tensor, lambda_b: Tensor, out: int, fan_in: int
) -> tuple[Tensor, Tensor]:
    """VeRA (Kopiczko et al. 2024) as LoRA factors: ΔW = (Λ_b·B[:out, :])·(Λ_d·A[:, :in]), scale 1.

    ``shared_a`` ``[r, max in]`` and ``shared_b`` ``[max out, r]`` are the frozen random projections shared by every
    layer, sliced to this layer's size; ``lambda_d`` ``[r]`` and ``lambda_b`` ``[out]`` are its trained vectors
    (peft/tuners/vera/layer.py ``get_delta_weight``). Returns (A' ``[r, in]``, B' ``[out, r]``).
    """
    a = _acc(lambda_d).unsqueeze(-1) * _acc(shared_a)[:, :fan_in]
    b = _acc(lambda_b).unsqueeze(-1) * _acc(shared_b)[:out, :]
    return a, b


def vera_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    """VeRA's shared A ``[r, max_in]`` and B ``[max_out, r]`` regenerated from ``projection_prng_key`` as PEFT draws
    them (``save_projection=False``): one CPU generator seeded with the key, A then B, each Kaiming-uniform with
    bound √3·√2/√fan_in (fan_in = max_in for A, r for B)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=gen))
    return out[0], out[1]


# -- additive, full rank ----------------------------------------------------------------------------------------------


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """CP/Tucker rebuild of a conv factor: einsum("ijkl,jr,ip->prkl") ``[out, in, k1, k2]`` (LyCORIS)."""
    return torch.einsum("ijkl,jr,ip->prkl", _acc(t), _acc(wb), _acc(wa))


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    scale: float,
    t1: Tensor | None = None,
    t2: Tensor | None = None,
) -> Tensor:
    """LoHa (Hyeon-Woo et al. 2022, FedPara): ΔW = ((W1a·W1b) ⊙ (W2a·W2b))·α/r.

    Linear and flattened conv: ``w1a`` ``[out, r]``, ``w1b`` ``[r, in·∏k]``, same for w2. Effective conv
    (``t1``/``t2`` ``[r, r, k1, k2]``): each factor is the Tucker rebuild of (t, wa ``[r, out]``, wb ``[r, in]``).
    Returned in the weight's own layout before reshaping (peft/tuners/loha/layer.py ``get_delta_weight``).
    """
    s = torch.tensor(scale, dtype=torch.float64 if w1a.dtype == torch.float64 else torch.float32)
    if t1 is not None and t2 is not None:
        return _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b) * s
    return ((_acc(w1a) @ _acc(w1b)) * (_acc(w2a) @ _acc(w2b))) * s


def lokr_delta(w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """LoKr (Yeh et al. 2024, LyCORIS): ΔW = (W1 ⊗ W2)·α/r, the Kronecker product of ``w1`` ``[a, c]`` and ``w2``
    ``[b, d]`` (or ``[b, d, k1, k2]`` for conv), giving ``[a·b, c·d(, k1, k2)]``. Each factor is either stored whole
    or as a product (``lokr_w1_a·lokr_w1_b``; conv ``lokr_t2`` as a Tucker rebuild): see ``lokr_factor``
    (peft/tuners/lokr/layer.py ``make_kron``)."""
    w1, w2 = _acc(w1), _acc(w2)
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.contiguous()) * scale


def lokr_factor(whole: Tensor | None, a: Tensor | None, b: Tensor | None, t: Tensor | None = None) -> Tensor:
    """One LoKr factor: stored whole, the product a·b, or (conv) the Tucker rebuild of (t, a ``[r, p]``,
    b ``[r, q]``)."""
    if whole is not None:
        return _acc(whole)
    assert a is not None and b is not None
    if t is not None:
        return torch.einsum("ijkl,ip,jr->prkl", _acc(t), _acc(a), _acc(b))
    return _acc(a) @ _acc(b)


# -- scaling --------------------------------------------------------------------------------------------------------


def ia3_factor(vector: Tensor, weight: float) -> Tensor:
    """IA³ (Liu et al. 2022) with adapter weight w: c = l for w = 1 (W' = W ⊙ l exactly, as PEFT merges), else
    c = 1 + w·(l − 1) so that W' = W + w·(W⊙l − W)."""
    v = _acc(vector).reshape(-1)
    return v if weight == 1 else 1 + weight * (v - 1)


def scale_rows(rows: Tensor, factor: Tensor, *, columns: bool) -> Tensor:
    """W ⊙ c in row view ``[out, in]``: c per input feature (``columns``: IA³ feed-forward modules, which scale the
    layer's input) or per output row (attention modules, which scale its output; the bias is scaled likewise).
    For conv the row view is ``[out, in·∏k]`` and a per-input-channel c repeats over the kernel positions."""
    if columns:
        repeat = rows.shape[1] // factor.numel()
        return rows * factor.repeat_interleave(repeat).unsqueeze(0)
    return rows * factor.unsqueeze(1)


# -- rotation -------------------------------------------------------------------------------------------------------


def _skew(vec: Tensor, block: int) -> Tensor:
    """Q ``[n, b, b]`` skew-symmetric from its strictly upper triangle ``vec`` ``[n, b(b−1)/2]`` (row-major)."""
    rows, cols = torch.triu_indices(block, block, 1)
    q = torch.zeros(vec.shape[0], block, block, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def _coft_project(vec: Tensor, block: int, eps: float) -> Tensor:
    """Constrained OFT: each block's Q is pulled back inside a Frobenius ball of radius eps/√n around 0
    (Qiu et al. 2023, as PEFT's ``_project_batch``)."""
    q = _skew(vec, block)
    eps_n = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    q = torch.where(norm <= eps_n, q, eps_n * (q / norm))
    rows, cols = torch.triu_indices(block, block, 1)
    return q[:, rows, cols]


def oft_blocks(
    vec: Tensor,
    block: int,
    *,
    neumann: bool = True,
    terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
) -> Tensor:
    """OFT's rotation blocks ``[n, b, b]`` from the stored ``oft_R.weight`` ``[n, b(b−1)/2]`` — Qiu et al. 2023,
    "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; Cayley transform as PEFT computes it
    (peft/tuners/oft/layer.py ``OFTRotationModule``):

    exact Cayley: R = (I − Q)(I + Q)⁻¹; Cayley–Neumann with t terms: R = I + 2Q + 2Q² + … + 2Q^{m−1} + Q^m,
    m = max(3, t − 1) for t > 2 (R = I + 2Q for t = 2), which is orthogonal only up to the truncated series.
    """
    v = _acc(vec)
    if coft:
        v = _coft_project(v, block, eps)
    q = _skew(v, block)
    n = q.shape[0]
    if not neumann:
        eye = torch.eye(block, dtype=q.dtype).expand(n, block, block)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = torch.eye(block, dtype=q.dtype).repeat(n, 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            r.add_(torch.bmm(power, q))
    return r


def rotation(blocks: Tensor, *, right: bool, weight_w: float = 1.0, inverse: bool = False) -> Tensor:
    """The per-block matrices M ``[n or 1, b, b]`` that ``rotate_by`` applies, from the rotation ``blocks``.

    ``right=False`` gives M = Rᵀ (Linear and conv: PEFT merges W' = (R·Wᵀ)ᵀ on the row view), ``right=True`` gives
    M = R (embedding: W' = W·R on the stored ``[num, dim]``). An adapter weight w ≠ 1 gives M = I + w·(M − I);
    ``inverse`` gives M⁻¹ (each b×b block solved: the transpose when R is exactly orthogonal).
    """
    m = blocks if right else blocks.transpose(-2, -1)
    if weight_w != 1:
        eye = torch.eye(m.shape[-1], dtype=m.dtype)
        m = eye + weight_w * (m - eye)
    return torch.linalg.inv(m) if inverse else m


def rotate_by(weight: Tensor, m: Tensor) -> Tensor:
    """W·M block by block along the last axis of ``weight`` ``[rows, n·b]``: each row's b-wide slice k times M_k
    (``m`` ``[n or 1, b, b]``, one block shared by all when block_share)."""
    n, b = weight.shape[1] // m.shape[-1], m.shape[-1]
    m = m.expand(n, b, b) if m.shape[0] == 1 else m
    w = _acc(weight).reshape(weight.shape[0], n, b)  # [rows, n, b]
    return torch.einsum("xnk,nkc->xnc", w, m).reshape(weight.shape)


def rotate(weight: Tensor, blocks: Tensor, *, right: bool, weight_w: float = 1.0, inverse: bool = False) -> Tensor:
    """W' = W·M applied block by block along the last axis of ``weight`` ``[rows, n·b]``, M from ``rotation``."""
    return rotate_by(weight, rotation(blocks, right=right, weight_w=weight_w, inverse=inverse))


# -- butterfly rotation (BOFT) ----------------------------------------------------------------------------------------


def boft_blocks(r: Tensor) -> Tensor:
    """BOFT's orthogonal blocks ``[N, D, H, H]`` from the stored ``boft_R`` ``[N, D, H, H]`` (N butterfly factors of
    D blocks of size H): the exact Cayley transform of each block's skew-symmetric part,
    R = (I − Q)(I + Q)⁻¹, Q = (A − Aᵀ)/2 (peft/tuners/boft/layer.py ``cayley_batch``)."""
    a = _acc(r)
    q = 0.5 * (a - a.transpose(-2, -1))
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def butterfly_perm(size: int, groups: int, chunk: int, factors: int) -> Tensor:
    """The block butterfly permutation of factor i (``groups`` = D/2ⁱ, ``chunk`` = H/2), as indices p with
    (P·x)[j] = x[p[j]]: within each group of size/``groups`` entries, chunks of ``chunk`` are reordered even-numbered
    first, then odd (peft/tuners/boft/layer.py ``block_butterfly_perm``). No butterfly (``factors`` = 1): identity."""
    if factors <= 1:
        return torch.arange(size)
    span = size // groups
    order = [*range(0, span // chunk, 2), *range(1, span // chunk, 2)]
    within = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in order])
    return (torch.arange(0, size, span).unsqueeze(1) + within).reshape(-1)


def boft_rotate(weight: Tensor, blocks: Tensor, *, inverse: bool = False) -> Tensor:
    """BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization") on the row
    view ``weight`` ``[rows, in]``: W·Mᵀ with M = F_{N−1}⋯F_1·F_0, F_i = P_i·diag(R_i,1 … R_i,D)·P_iᵀ (P_i from
    ``butterfly_perm``, the R from ``boft_blocks``), as PEFT's ``get_delta_weight`` composes it and its merge applies
    it (W' = (M·Wᵀ)ᵀ ⊙ s; the scale s is ``scale_rows``'). Applied factor by factor without building the
    ``[in, in]`` matrix: W·F_iᵀ = ((W·P_i)·diag(R_i)ᵀ)·P_iᵀ, and a column permutation is a gather.
    ``inverse`` applies M⁻ᵀ = M (M is orthogonal): the factors in reverse order, each by its blocks themselves.
    """
    n_factors, d, h = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    size = weight.shape[1]
    w = _acc(weight)
    steps = range(n_factors - 1, -1, -1) if inverse else range(n_factors)
    for i in steps:
        perm = butterfly_perm(size, d // 2**i, h // 2, n_factors)
        w = w[:, torch.argsort(perm)] if n_factors > 1 else w  # W·P_i
        w = rotate_by(w, blocks[i] if inverse else blocks[i].transpose(-2, -1))
        w = w[:, perm] if n_factors > 1 else w  # ·P_iᵀ
    return w
