"""GPTQ's per-layer core: equal to round-to-nearest when the inputs are uncorrelated (H = I), and a lower output
error than round-to-nearest on correlated inputs, which is what the error feedback is for."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.quantize import int4
from weightsmith.compress.quantize.gptq import gptq_int4


@pytest.mark.parametrize("asymmetric", [False, True])
def test_identity_hessian_is_round_to_nearest(asymmetric):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q, s, z = gptq_int4(w, torch.eye(64), group_size=32, asymmetric=asymmetric, damp=0.0, block_size=32)
    q0, s0, z0 = int4.quantize_int4(w, 32, asymmetric)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    assert (z is None and z0 is None) or torch.equal(z, z0)


@pytest.mark.parametrize("group_size,block_size", [(32, 64), (None, 32), (64, 32)])
def test_lower_output_error_than_rtn_on_correlated_inputs(group_size, block_size):
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=gen) / 8 + torch.eye(64)
    x = torch.randn(2048, 64, generator=gen) @ mix  # correlated input features
    w = torch.randn(32, 64, generator=gen)
    q, s, z = gptq_int4(w, 2 * x.T @ x, group_size=group_size, block_size=block_size)
    gptq_w = int4.dequantize_int4(q, s, z)
    rtn_w = int4.dequantize_int4(*int4.quantize_int4(w, group_size))
    err = float(torch.linalg.vector_norm(x @ (w - gptq_w).T))
    rtn = float(torch.linalg.vector_norm(x @ (w - rtn_w).T))
    assert err < 0.9 * rtn
    assert int(q.min()) >= -8 and int(q.max()) <= 7
