"""all_finite against the element-wise definition (torch.isfinite(t).all()), including the sums that overflow."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from weightsmith.numerics import all_finite

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, 3e38, -3e38, 65504.0, 1.0]


@given(
    values=st.lists(st.sampled_from(SPECIAL) | st.floats(-1e6, 1e6), min_size=1, max_size=64),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_all_finite_is_the_element_wise_check(values, dtype):
    t = torch.tensor(values, dtype=torch.float64).to(dtype)  # out-of-range values become ±Inf in small dtypes
    assert all_finite(t) == bool(torch.isfinite(t).all())


@pytest.mark.parametrize(
    "t",
    [
        torch.full((1000,), 65504.0, dtype=torch.float16),  # the fp16 sum overflows; every element is finite
        torch.full((8,), 3e38, dtype=torch.float32),  # even the float32 sum overflows
        torch.tensor([3e38, -3e38, 3e38, 3e38], dtype=torch.bfloat16),
    ],
)
def test_finite_tensors_whose_sum_overflows_are_finite(t):
    assert not torch.isfinite(t.sum())
    assert all_finite(t)


def test_one_bad_element_among_many_is_found():
    t = torch.randn(4096, dtype=torch.bfloat16)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[1234] = bad
        assert not all_finite(u)
    u = t.clone()
    u[0], u[1] = float("inf"), float("-inf")  # their sum is NaN, not Inf: still caught
    assert not all_finite(u)


def test_integer_tensors_are_finite():
    assert all_finite(torch.arange(10, dtype=torch.int8))
