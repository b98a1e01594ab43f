"""Quantization math a slice of a weight at a time.

A kernel's float32 temporaries (the copy it divides and rounds in place, |W|, the codes before packing) are then the
size of a slice, about 1 MiB, which glibc reuses from its heap, instead of the size of the weight, which it maps
afresh for every weight: each fresh page is a fault the kernel zeroes (a 1 GB float32 NF4 quantize took 2.3 million
faults, 4 s of system time on two cores). Each slice holds whole rows (per-row and per-group schemes) or whole
blocks (NF4), so the results are the kernel's on the whole weight, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

CHUNK_VALUES = 1 << 18  # values a slice holds at most (unless one unit is longer): 1 MiB of float32


def spans(units: int, unit_values: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of ``units`` consecutive units (rows, blocks) of ``unit_values`` values each, covering
    them in order, each at most ``CHUNK_VALUES`` values long (one unit at least); one empty range for no units, so
    that an empty weight still goes through its kernel once."""
    step = max(1, CHUNK_VALUES // max(1, unit_values))
    return ((start, min(start + step, units)) for start in range(0, max(units, 1), step))


def by_rows(quantize: Callable[[torch.Tensor], tuple[Any, ...]], w: torch.Tensor) -> tuple[Any, ...]:
    """``quantize(w)`` for a ``quantize`` whose outputs are row-wise (row i of each output depends on row i of ``w``
    alone), computed on slices of rows and concatenated along the rows; an output that is None stays None."""
    slices = [quantize(w[start:stop]) for start, stop in spans(w.shape[0], w.shape[1:].numel())]
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*slices))


def absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max |x| along ``dim``, as max(max x, −min x): exact, with no |x| temporary, and on a slice ten times faster
    than ``vector_norm(x, ord=inf)``. ``abs_`` gives a zero maximum its plus sign, as |x| has."""
    return torch.maximum(x.amax(dim), x.amin(dim).neg_()).abs_()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F in fp32 (0 for an all-zero W reproduced exactly), the squared norms summed slice by slice
    in float64: one fp32 copy of a slice at a time, the difference made in place."""
    a, b = w.reshape(-1), w_hat.reshape(-1)
    norm2 = err2 = 0.0
    for start, stop in spans(a.numel(), 1):
        diff = a[start:stop].to(torch.float32, copy=True)
        norm2 += float(torch.linalg.vector_norm(diff)) ** 2
        err2 += float(torch.linalg.vector_norm(diff.sub_(b[start:stop]))) ** 2
    return (err2 / norm2) ** 0.5 if norm2 else (0.0 if err2 == 0 else float("inf"))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F of two tensors of the same size: the difference made in float32 a slice at a time (a copy of a's
    slice, b subtracted in place), its norm taken in float64 and the squares summed."""
    x, y = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start, stop in spans(x.numel(), 1):
        diff = x[start:stop].to(torch.float32, copy=True).sub_(y[start:stop])
        total += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
    return total**0.5
