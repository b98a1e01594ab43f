"""GPTQ's weight update for one Linear layer, as a pure function on tensors (no model, no files).

``gptq_driver.py`` runs the calibration text through the model one decoder layer at a time, gathers the Hessian of
every Linear's inputs and calls ``gptq_int4`` for each; the result is in the int4 layout of ``int4.py``.
"""

from __future__ import annotations

import torch

from weightsmith.compress.quantize.int4 import QMAX, QMIN, quantize_int4


def gptq_int4(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int | None = 128,
    asymmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ (Frantar et al. 2023, "GPTQ: accurate post-training quantization for generative pre-trained
    transformers"): quantize W [out, in] column by column, each column's rounding error e_j = (w_j − q_j) / [H⁻¹]_jj
    fed back into the columns not yet quantized, w_k −= e_j · [H⁻¹]_jk, with U = chol(H⁻¹) upper (the paper's
    Cholesky form) and lazy block updates of ``block_size`` columns.

    H = 2 XᵀX over the layer's calibration inputs X [tokens, in] (any positive multiple gives the same result);
    dampened by ``damp`` · mean(diag H) on the diagonal. Columns no input ever reached (H_jj = 0) are zeroed. Each
    group's scale (and zero point) comes from its columns as updated when the group starts, with int4's min-max
    ranges. ``act_order``: columns are visited in decreasing H_jj (the paper's act-order) and every group's scale is
    fixed beforehand from its original columns ("static groups"), so codes stay in stored column order with no
    permutation to record. Runs on ``w``'s device. Returns the int4 codes int8 [out, in], scales [out, in/g] in
    ``w``'s dtype and zero points (or None), exactly as ``int4.quantize_int4`` does for round-to-nearest; with H = I
    the two agree.
    """
    out_features, in_features = w.shape
    g = group_size or in_features
    if in_features % g or (block_size % g and g % block_size):
        raise ValueError(f"gptq: width {in_features}, group size {g} and block size {block_size} do not align")
    W = w.float().clone()  # (out, in), updated in place as errors are fed forward
    H = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # + damp · mean(diag H) · I, without an [in, in] identity
    groups = in_features // g
    scale = torch.empty(out_features, groups, dtype=w.dtype, device=w.device)
    zero = torch.empty(out_features, groups, dtype=torch.int8, device=w.device) if asymmetric else None
    perm = torch.arange(in_features, device=w.device)
    if act_order:  # static groups: every scale from the original columns, before any error is fed back
        _, scale, zero = quantize_int4(W.to(w.dtype), group_size, asymmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky_(H)  # chol(H⁻¹), upper, in H's storage
    del H
    codes = torch.empty(out_features, in_features, dtype=torch.int8, device=w.device)
    # the rank-1 products fed back go into one buffer made once (a fresh one per column was a page fault per 4 KiB);
    # a block's errors reach the columns ahead by one in-place matrix product, with no [out, in] temporary
    outer = torch.empty(out_features * block_size, device=w.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            col = int(perm[j])  # the column's place in the stored weight (j itself without act-order)
            if not act_order and j % g == 0:  # a new group: its range from the columns as they stand now
                cols = W1[:, i : i + g] if i + g <= i2 - i1 else torch.cat([W1[:, i:], W[:, i2 : j + g]], dim=1)
                _, s, z = quantize_int4(cols.to(w.dtype), None, asymmetric)
                scale[:, j // g] = s[:, 0]
                if zero is not None and z is not None:
                    zero[:, j // g] = z[:, 0]
            s_col = scale[:, col // g].float()
            z_col = zero[:, col // g].float() if zero is not None else 0.0
            q = torch.round((W1[:, i] / s_col + z_col).clamp(QMIN, QMAX))
            codes[:, col] = q.to(torch.int8)
            err = (W1[:, i] - (q - z_col) * s_col) / U[j, j]
            rank1 = outer[: out_features * (i2 - j)].view(out_features, i2 - j)
            W1[:, i:] -= torch.mul(err.unsqueeze(1), U[j, j:i2].unsqueeze(0), out=rank1)
            E1[:, i] = err
        if i2 < in_features:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1)
    return codes, scale, zero


def inverse_cholesky_(h: torch.Tensor, block: int = 128) -> torch.Tensor:
    """U upper triangular with UᵀU = H⁻¹ — the Cholesky factor of H's inverse that GPTQ's column loop reads —
    written over ``h`` (symmetric positive definite); returns ``h``. Beyond H it needs a few panels of ``block``
    columns.

    Two blocked passes in place: H = R·Rᵀ with R upper (Cholesky run from the last block of columns back), then U =
    R⁻¹ (a triangular inverse, blocks in order: [[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹·B·C⁻¹], [0, C⁻¹]]). Since H⁻¹ =
    R⁻ᵀ·R⁻¹ and a Cholesky factor with a positive diagonal is unique, U = chol(H⁻¹): the matrix of the GPTQ paper's
    chol(cholesky_inverse(chol(H)), upper), which holds three [in, in] matrices at once (on a 2816-wide Hessian 105
    MB of temporaries, here 37 MB; as close to a float64 reference, 3.5e-6 vs 3.9e-6).
    """
    n = h.shape[0]
    starts = range(0, n, block)
    for s in reversed(starts):  # H = R·Rᵀ
        e = min(s + block, n)
        diagonal = h[s:e, s:e]
        r = torch.linalg.cholesky(diagonal.flip(0, 1)).flip(0, 1)  # upper, diagonal = r·rᵀ
        diagonal.copy_(r)
        if s:
            panel = torch.linalg.solve_triangular(r.T, h[:s, s:e], upper=False, left=False)  # R[:s, K] · rᵀ = H[:s, K]
            h[:s, s:e] = panel
            h[:s, :s].addmm_(panel, panel.T, alpha=-1)  # what is left of H[:s, :s] for the blocks before
    h.triu_()
    eye = torch.eye(min(block, n), dtype=h.dtype, device=h.device)
    for s in starts:  # U = R⁻¹; h[:s, :s] already holds the inverse of R[:s, :s]
        e = min(s + block, n)
        inverse = torch.linalg.solve_triangular(h[s:e, s:e], eye[: e - s, : e - s], upper=True)
        if s:
            h[:s, s:e] = torch.mm(h[:s, :s] @ h[:s, s:e], inverse).neg_()
        h[s:e, s:e] = inverse
    return h


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖_F over the calibration inputs, from H = 2XᵀX alone: √(tr(ΔW H ΔWᵀ) / 2), ΔW = W − Ŵ."""
    delta = (w.float() - w_hat.float()).to(hessian.device)
    return float(torch.sqrt(torch.clamp(torch.sum((delta @ hessian.float()) * delta) / 2, min=0)))
