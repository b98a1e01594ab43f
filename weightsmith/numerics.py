"""Checks on tensor values shared by the verbs that refuse NaN and Inf."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or ±Inf.

    One reduction, with no temporary the size of ``t``: IEEE addition propagates NaN and Inf (and Inf + −Inf is NaN),
    so a finite sum proves every element finite. torch accumulates half-precision sums in float32 and rounds the
    result to ``t``'s dtype (asking for a float32 result instead would copy ``t``); only a tensor whose sum is not
    finite (NaN or Inf inside, or finite values whose sum overflows, as fp16's does past 65504) is checked element
    by element.
    """
    if not t.is_floating_point():
        return bool(torch.isfinite(t).all())  # integers (always finite) and complex: element by element
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
