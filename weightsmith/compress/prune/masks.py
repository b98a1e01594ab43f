"""Pruning masks as pure functions on tensors. ``True`` in a mask means *keep*; callers multiply by it.

Every function takes a score tensor (never mutated) and returns a bool mask of the same shape. Weights are [out, in]
(output rows, input columns); GPT-2's Conv1D [in, out] weights are transposed by the caller first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from weightsmith.sparsify import select_indices


def _keep_all_but_lowest(scores: Tensor, k: int, dim: int | None = None) -> Tensor:
    """Mask dropping exactly the ``k`` lowest scores (over all of ``scores``, or per slice along ``dim``)."""
    if dim is None:
        flat = scores.reshape(-1)
        mask = torch.ones(flat.numel(), dtype=torch.bool)
        if k > 0:
            mask[select_indices(flat, k, largest=False)] = False
        return mask.reshape(scores.shape)
    mask = torch.ones(scores.shape, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, select_indices(scores, k, largest=False, dim=dim), False)
    return mask


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Unstructured magnitude pruning of one tensor: drop the round(s·numel) entries of smallest |W|.

    Han et al. 2015, "Learning both weights and connections". Exactly that many entries are dropped, ties broken by
    ``weightsmith.sparsify``'s stated rule (among equal magnitudes the lower flat index goes first), so the sparsity
    is exact and the same weights go on every torch version even when many weights share a value.
    """
    scores = weight.detach().abs().float()
    return _keep_all_but_lowest(scores, round(sparsity * scores.numel()))


def wanda_mask(weight: Tensor, input_norm: Tensor, sparsity: float) -> Tensor:
    """Wanda: score S_ij = |W_ij| · ‖X_j‖₂, drop the round(s·in) lowest scores *within each output row* i.

    Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models". ``weight`` is [out, in];
    ``input_norm`` is [in], the L2 norm of input feature j over all calibration tokens.
    """
    scores = wanda_scores(weight, input_norm)
    return _keep_all_but_lowest(scores, round(sparsity * weight.shape[1]), dim=1)


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """|W| · ‖X‖ broadcast over rows: [out, in] × [in] → [out, in], in float32."""
    return weight.detach().abs().float() * input_norm.float().reshape(1, -1)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M semi-structured sparsity: in every group of ``m`` consecutive inputs of a row keep the ``n`` highest scores.

    Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (NVIDIA 2:4). ``scores`` is [out, in] with
    in % m == 0; use |W| for magnitude or |W|·‖X‖ for Wanda (as the Wanda paper does for 2:4).
    """
    out, width = scores.shape
    groups = scores.float().reshape(out, width // m, m)  # (out, groups, m)
    return _keep_all_but_lowest(groups, m - n, dim=2).reshape(out, width)


def fp32_bits(values: Tensor) -> Tensor:
    """The int32 bit patterns of |values| as float32: for non-negative floats they sort exactly as the values do."""
    return values.detach().abs().float().contiguous().view(torch.int32)


def global_bin_histogram(weight: Tensor, *, level: int, prefix: int | None = None) -> Tensor:
    """One tensor's counts for radix selection over |W|: 65536 bins of the high (level 0) or low (level 1) 16 bits.

    At level 1 only entries whose high 16 bits equal ``prefix`` are counted. Memory: one [65536] int64 histogram.
    """
    bits = fp32_bits(weight).reshape(-1)
    if level == 0:
        keys = bits >> 16
    else:
        keys = bits[(bits >> 16) == prefix] & 0xFFFF
    return torch.bincount(keys.long(), minlength=65536)


def select_bin(histogram: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th smallest entry (1-based) and the number of entries in lower bins."""
    cumulative = torch.cumsum(histogram, 0)
    b = int(torch.searchsorted(cumulative, torch.tensor(k), right=False))
    below = int(cumulative[b - 1]) if b > 0 else 0
    return b, below


def threshold_mask(weight: Tensor, threshold_bits: int, quota: int) -> tuple[Tensor, int]:
    """Global-threshold mask of one tensor: drop every |W| below the threshold and, in storage order, up to ``quota``
    entries exactly equal to it (the ties the global count still needs). Returns the mask and the ties used."""
    bits = fp32_bits(weight).reshape(-1)
    mask = bits > threshold_bits
    ties = torch.nonzero(bits == threshold_bits).reshape(-1)
    used = min(quota, ties.numel())
    mask[ties[used:]] = True  # the ties beyond the quota stay
    return mask.reshape(weight.shape), used
