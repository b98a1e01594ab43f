"""Pure tensor math of LoRA folding, unfolding and extraction. No files, no names: tensors in, tensors out.

Every module kind is reduced to one 2-D picture, the weight seen as ``[out, in]`` ("row view"), so a single fold
serves Linear, GPT-2 Conv1D (stored ``[in, out]``), Embedding (stored ``[num, dim]``, adapted as ``[dim, num]``) and
ConvNd (``[out, in, *k]`` flattened to ``[out, in·∏k]``). Everything is computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# How each kind stores its weight relative to the row view [out, in].
LINEAR, CONV1D, EMBEDDING, CONV = "linear", "conv1d", "embedding", "conv"

_BLOCK_ELEMENTS = 1 << 18  # elements per block of rows in add_lora_: about 1 MB of float32


def _acc(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def to_rows(weight: Tensor, kind: str) -> Tensor:
    """The stored weight as its row view ``[out, in]`` (a view or transpose, never a copy of the caller's data)."""
    if kind in (CONV1D, EMBEDDING):  # stored [in, out] / [num, dim]; rows are the output features / dim
        return weight.t()
    if kind == CONV:
        return weight.reshape(weight.shape[0], -1)
    return weight


def from_rows(rows: Tensor, kind: str, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``to_rows``: back to the stored layout ``shape``."""
    if kind in (CONV1D, EMBEDDING):
        return rows.t().contiguous()
    return rows.reshape(shape)


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = α / r (Hu et al. 2021, "LoRA"), or α / √r with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta_rows(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """ΔW = s · B·A in row view ``[out, in]``.

    ``a`` is ``[r, in]`` (or ``[r, in, *k]`` for conv), ``b`` is ``[out, r]`` (or ``[out, r, 1, …]``); embedding
    adapters pass ``lora_embedding_B [dim, r]`` and ``lora_embedding_A [r, num]``. The product is taken before the
    scaling, as PEFT's ``get_delta_weight`` does. Half-precision factors are upcast first: PEFT loads adapters in
    float32 by default (``autocast_adapter_dtype=True``), so ΔW is never rounded before it is added.
    """
    a2 = _acc(a).reshape(a.shape[0], -1)  # [r, in·∏k]
    b2 = _acc(b).reshape(b.shape[0], -1)  # [out, r]
    return (b2 @ a2) * scaling


def stored_factors(a: Tensor, b: Tensor, kind: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(L, R) with L·R = B·A laid out as the weight is stored, flattened to 2-D ``[stored rows, rest]``.

    Linear and conv store the row view itself (L = B ``[out, r]``, R = A ``[r, in·∏k]``); Conv1D and embedding
    store its transpose (L = Aᵀ ``[in, r]``, R = Bᵀ ``[r, out]``). Shapes of ``a``/``b`` as in ``lora_delta_rows``.
    """
    a2 = a.to(dtype).reshape(a.shape[0], -1)  # [r, in·∏k]
    b2 = b.to(dtype).reshape(b.shape[0], -1)  # [out, r]
    return (a2.t(), b2.t()) if kind in (CONV1D, EMBEDDING) else (b2, a2)


def in_row_blocks_(src: Tensor, dst: Tensor, apply: Callable[[Tensor, int, int], None]) -> None:
    """dst[i:j] = f(src[i:j]) block of rows by block of rows, computed in float32 and rounded once to ``dst``'s dtype.

    ``src`` and ``dst`` are the stored weight flattened to 2-D (they may be the same tensor: the fold then happens
    in place). ``apply(block, i, j)`` changes the float32 block of rows i..j in place (float64 stays float64).
    Blocks are about a megabyte, so no float32 copy of the weight ever exists whole and the work stays in the CPU
    cache; one block buffer serves every block (a fresh megabyte per block costs an allocation each, and the
    allocator's churn shows in peak RSS); a float32 ``src`` is changed in place without a copy.
    """
    step = block_rows(src.shape[1])
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    buffer = None if src.dtype == acc else torch.empty((min(step, src.shape[0]), src.shape[1]), dtype=acc)
    for start in range(0, src.shape[0], step):
        stop = min(start + step, src.shape[0])
        if buffer is None:
            block = src[start:stop]  # already float32 (or float64): changed in place
        else:
            block = buffer[: stop - start]
            block.copy_(src[start:stop])
        apply(block, start, stop)
        out = dst[start:stop]
        if block.data_ptr() != out.data_ptr():
            out.copy_(block)


def block_rows(columns: int) -> int:
    """Rows per block of ``in_row_blocks_`` for a weight of ``columns`` columns (row view flattened to 2-D)."""
    return max(1, _BLOCK_ELEMENTS // max(1, columns))


def add_product_(
    block: Tensor,
    left: Tensor,
    right: Tensor,
    scale: float,
    divisor: float | None = None,
    scratch: list[Tensor] | None = None,
) -> None:
    """block += s·(L·R), the product rounded before the scale as PEFT's ``get_delta_weight`` takes it (a fused
    ``addmm_``); with ``divisor`` d, block += (s·(L·R)) / d, each step rounded as PEFT's AdaLoRA does
    (``B @ (A*E) * scaling / (ranknum + 1e-5)``), so that the result is bit-identical to its merge. ``scratch``
    (a list, empty at first) keeps the product's buffer from one block to the next."""
    if divisor is None:
        block.addmm_(left, right, alpha=scale)
        return
    if scratch is not None and (not scratch or scratch[0].shape[0] < block.shape[0] or scratch[0].dtype != block.dtype):
        scratch[:] = [torch.empty(block.shape, dtype=block.dtype)]
    out = scratch[0][: block.shape[0]] if scratch else None
    block.addcdiv_(torch.mm(left, right, out=out), torch.tensor(divisor, dtype=block.dtype), value=scale)


def add_lora_(src: Tensor, dst: Tensor, terms: list[tuple[Tensor, Tensor, float, float | None]]) -> None:
    """dst = src + Σ sᵢ·Lᵢ·Rᵢ by ``in_row_blocks_``; ``terms`` are ``stored_factors`` with their scale and divisor
    (``add_product_``)."""

    scratch: list[Tensor] = []

    def add(block: Tensor, start: int, stop: int) -> None:
        for left, right, scale, divisor in terms:
            add_product_(block, left[start:stop], right, scale, divisor, scratch)

    in_row_blocks_(src, dst, add)


def dora_rows(weight_rows: Tensor, delta_rows: Tensor, magnitude: Tensor) -> Tensor:
    """W' = m / ‖W + ΔW‖_row · (W + ΔW) in row view — Liu et al. 2024, "DoRA", as PEFT merges it.

    The L2 norm is taken per output row over the input dimension (per output channel for conv, per embedding
    dimension for embeddings); m is the adapter's ``lora_magnitude_vector`` ``[out]``.
    """
    v = _acc(weight_rows) + delta_rows  # [out, in]
    norm = torch.linalg.vector_norm(v, dim=1)  # [out]
    return (_acc(magnitude) / norm).unsqueeze(1) * v


def truncated_factors(
    delta_rows: Tensor, *, rank: int | None = None, energy: float | None = None
) -> tuple[Tensor, Tensor, float]:
    """Best rank-k factors of ΔW ``[out, in]`` by SVD (Eckart–Young): B = U_k·√S_k ``[out, k]``, A = √S_k·V_kᵀ
    ``[k, in]``, and the energy kept Σ_{i≤k} σᵢ² / Σ σᵢ².

    ``rank`` fixes k (capped at min(out, in)); ``energy`` picks the smallest k keeping at least that fraction.
    The split √S on both sides keeps A and B on the same scale.
    """
    d = _acc(delta_rows)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)  # u [out, n], s [n], vh [n, in]
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        raise ValueError("ΔW is zero")
    cumulative = torch.cumsum(power, 0) / total
    if rank is not None:
        k = min(rank, s.numel())
    else:
        assert energy is not None  # one of rank and energy is given (checked by the callers)
        k = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
        k = min(k, s.numel())
    root = s[:k].sqrt()
    b = u[:, :k] * root  # [out, k]
    a = root.unsqueeze(1) * vh[:k]  # [k, in]
    return a.contiguous(), b.contiguous(), float(cumulative[k - 1])
