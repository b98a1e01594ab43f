"""The round-to-nearest schemes work on slices of a weight (``compress.quantize.chunks``); with slices far smaller
than the weights, the stored tensors must be those of the whole-tensor kernels (bitsandbytes' own for NF4)."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.quantize import chunks, fp8, int4, int8, nf4
from weightsmith.compress.quantize.schemes import FP8, Int4, Int8

# a partial NF4 block, an odd count of values, one row, rows shorter than a block, no rows
SHAPES = [(37, 130), (3, 131), (1, 64), (129, 8), (0, 64)]


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_VALUES", 300)


def _weight(shape, dtype):
    torch.manual_seed(sum(shape))
    return (torch.randn(shape) * torch.rand(shape[0], 1) * 3).to(dtype)  # rows of different ranges


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_sliced_nf4_is_bitsandbytes_on_the_whole_tensor(small_slices, shape, dtype, double_quant):
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = _weight(shape, dtype)
    ours = nf4.quantize_nf4(w, 64, double_quant)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    reference = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, 64, list(shape), dtype)
    assert torch.allclose(nf4.dequantize_module(ours).float(), reference.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 128), (1, 64), (129, 8), (0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_row_schemes_equal_their_whole_tensor_kernels(small_slices, shape, dtype):
    w = _weight(shape, dtype)
    cases = [
        (int8.quantize_module(Int8(), w), dict(zip(("weight", "weight_scale"), int8.quantize_int8(w)))),
        (int8.quantize_module(Int8(group_size=8), w), dict(zip(("weight", "weight_scale"), int8.quantize_int8(w, 8)))),
        (fp8.quantize_module(FP8(), w), dict(zip(("weight", "weight_scale"), fp8.quantize_fp8(w)))),
    ]
    for options in ({"group_size": 8}, {"group_size": 8, "asymmetric": True}, {"group_size": 0}):
        scheme = Int4(**options)
        whole = int4.quantize_int4(w, scheme.group_size or None, scheme.asymmetric)
        cases.append((int4.quantize_module(scheme, w), int4.pack_module(*whole)))
    for ours, theirs in cases:
        assert list(ours) == list(theirs)
        for key in theirs:
            a, b = ours[key], theirs[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key  # FP8: bitwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_relative_error_over_slices_is_the_float64_one(small_slices, dtype):
    w = _weight((37, 130), dtype)
    w_hat = nf4.dequantize_module(nf4.quantize_nf4(w))
    exact = float((w.double() - w_hat.double()).norm() / w.double().norm())
    assert chunks.relative_error(w, w_hat) == pytest.approx(exact, rel=1e-6)
    assert chunks.relative_error(torch.zeros(5, 7), torch.zeros(5, 7)) == 0.0
    assert chunks.relative_error(torch.zeros(5, 7), torch.ones(5, 7)) == float("inf")
    assert len(list(chunks.spans(37 * 130, 1))) == 17  # the error above was summed over 17 slices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_distance_over_slices_is_the_float64_one(small_slices, dtype):
    a, b = _weight((37, 130), dtype), _weight((37, 130), torch.float32).flip(0)  # mixed dtypes, as a fold's report
    exact = float((a.double() - b.double()).norm())
    assert chunks.distance(a, b) == pytest.approx(exact, rel=1e-6)
    assert chunks.distance(b, a) == pytest.approx(exact, rel=1e-6)
    assert chunks.distance(a, a) == 0.0 and chunks.distance(torch.zeros(0, 4), torch.zeros(0, 4)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_codes_at_ties_zeros_subnormals_and_extremes_are_bitsandbytes(dtype, double_quant):
    import bitsandbytes.functional as F

    levels = F.get_4bit_type("nf4", device="cpu")
    midpoints = (levels[:-1] + levels[1:]) / 2  # where bitsandbytes' bucketize breaks ties (to the lower level)
    rows = [
        torch.zeros(128),  # absmax 0: bitsandbytes divides by 1e-38
        -torch.zeros(128),
        torch.full((128,), 1e-40),  # subnormal
        torch.cat([midpoints, torch.ones(1)]).repeat(8) * 3,  # exact ties once scaled by the absmax (3)
        torch.cat([midpoints, -torch.ones(1)]).repeat(8),
        torch.nextafter(midpoints, torch.tensor(2.0)).repeat(9)[:128],  # just above each tie
        (torch.rand(128) * 2 - 1) * torch.finfo(dtype).max * 0.9,  # the dtype's extremes
    ]
    w = torch.stack(rows).to(dtype)
    for weight in (w, w.reshape(-1)[:-3].reshape(1, -1)):  # a partial last block and an odd count
        ours = nf4.quantize_nf4(weight, 64, double_quant)
        packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_absmax_is_the_max_of_abs_to_the_bit():
    x = torch.randn(6, 3, 64)
    x[0] = 0.0
    x[1] = -0.0
    x[2, 0] = -torch.rand(64)  # all negative
    x[3, 1] = torch.rand(64)  # all positive
    x[4, :, :32] = -0.0  # mixed signed zeros
    x[4, :, 32:] = 0.0
    for dim in (-1, 1, 0):
        ours, theirs = chunks.absmax(x, dim), x.abs().amax(dim)
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())


def test_importing_bitsandbytes_defers_its_compiles_to_their_first_call():
    """bitsandbytes compiles its CPU fallbacks as it imports them; weightsmith's import leaves torch's compiler
    unloaded and those functions still compiled, and right, when first called."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from weightsmith.compress.quantize import nf4\n"
        "F = nf4._bnb()\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "assert torch.compile.__module__ == 'torch'\n"  # restored
        "from bitsandbytes.backends.default import ops\n"
        "codes = torch.randint(0, 256, (512,), dtype=torch.uint8)\n"
        "absmax, code = torch.rand(2), F.create_dynamic_map(signed=True)\n"
        "out = ops._dequantize_blockwise_compute(codes, absmax, code, 256, torch.float32)\n"
        "assert 'torch._dynamo' in sys.modules\n"  # compiled on this first call
        "assert torch.equal(out, (code[codes.long()].reshape(2, 256) * absmax[:, None]).reshape(-1))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
