"""GPTQ's per-layer core: equal to round-to-nearest when the inputs are uncorrelated (H = I), and a lower output
error than round-to-nearest on correlated inputs, which is what the error feedback is for."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.quantize import int4
from weightsmith.compress.quantize.gptq import gptq_int4, output_error


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


def test_act_order_with_identity_hessian_is_round_to_nearest():
    """Static groups: every scale from the original columns, so with no error to feed back the visiting order
    changes nothing."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.linspace(2.0, 1.0, 64))  # distinct H_jj: a real permutation, still no cross terms
    q, s, _ = gptq_int4(w, h, group_size=32, damp=0.0, block_size=32, act_order=True)
    q0, s0, _ = int4.quantize_int4(w, 32)
    assert torch.equal(q, q0) and torch.equal(s, s0)


@pytest.mark.parametrize("group_size", [32, None])
def test_act_order_beats_rtn_on_correlated_inputs(group_size):
    gen = torch.Generator().manual_seed(3)
    scales = torch.linspace(0.2, 3.0, 64)[torch.randperm(64, generator=gen)]  # uneven input energy
    x = (torch.randn(2048, 64, generator=gen) @ (torch.randn(64, 64, generator=gen) / 8 + torch.eye(64))) * scales
    w = torch.randn(32, 64, generator=gen)
    q, s, z = gptq_int4(w, 2 * x.T @ x, group_size=group_size, block_size=32, act_order=True)
    err = float(torch.linalg.vector_norm(x @ (w - int4.dequantize_int4(q, s, z)).T))
    rtn = float(torch.linalg.vector_norm(x @ (w - int4.dequantize_int4(*int4.quantize_int4(w, group_size))).T))
    assert err < 0.9 * rtn


def test_output_error_from_the_hessian_equals_the_direct_one():
    gen = torch.Generator().manual_seed(4)
    x, w, w_hat = (
        torch.randn(300, 48, generator=gen),
        torch.randn(8, 48, generator=gen),
        torch.randn(8, 48, generator=gen),
    )
    direct = float(torch.linalg.vector_norm(x @ (w - w_hat).T))
    assert abs(output_error(w, w_hat, 2 * x.T @ x) - direct) < 1e-3 * direct


@pytest.mark.parametrize(("n", "block"), [(300, 128), (256, 128), (97, 1), (64, 128)])
def test_inverse_cholesky_in_place_equals_the_papers_chain(n, block):
    from weightsmith.compress.quantize.gptq import inverse_cholesky_

    g = torch.Generator().manual_seed(n)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    h = x.T @ x / (4 * n)
    h.diagonal().add_(0.01 * h.diagonal().mean())
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = h.clone()
    u = inverse_cholesky_(work, block)
    assert u.data_ptr() == work.data_ptr()  # written over the Hessian
    torch.testing.assert_close(u, reference, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(u.T @ u @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-8)


class _TwoReaders(torch.nn.Module):
    """a and b read the same tensor, unless a sample asks b to read another; c reads their sum."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

    def forward(self, h, *, apart=False):
        return self.c(self.a(h) + self.b(h * 2 if apart else h))


@pytest.mark.parametrize("apart", [[False, False, False], [False, True, False]])
def test_hessians_shared_by_linears_reading_one_tensor_equal_their_own(apart):
    from weightsmith.compress.quantize.gptq_driver import _hessians

    torch.manual_seed(0)
    layer = _TwoReaders()
    hidden = [torch.randn(1, 4 + i, 6) for i in range(len(apart))]
    inputs = [{"args": (), "kwargs": {"apart": flag}} for flag in apart]
    linears = {"a": layer.a, "b": layer.b, "c": layer.c}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}  # every input, recorded independently
    handles = [
        m.register_forward_pre_hook(lambda m, args, n=n: seen[n].append(args[0].double())) for n, m in linears.items()
    ]
    with torch.no_grad():
        for h, x in zip(hidden, inputs):
            layer(h, **x["kwargs"])
    for handle in handles:
        handle.remove()

    got = _hessians(layer, linears, hidden, inputs)
    for name, xs in seen.items():
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        torch.testing.assert_close(got[name].double(), 2 * flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-6)
    assert (got["a"] is got["b"]) == (not any(apart))  # one sum for a and b only while they read one tensor
