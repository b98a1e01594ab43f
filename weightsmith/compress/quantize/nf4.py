"""NF4 weights in the layout transformers writes for a bitsandbytes 4-bit model (``save_pretrained`` of a
``load_in_4bit`` model), computed and serialised by bitsandbytes itself.

Per quantized Linear ``<m>`` (W [out, in], n = out·in):
- ``<m>.weight`` uint8 [n/2, 1]: two 4-bit codes a byte, the first element in the high nibble;
- ``<m>.weight.absmax`` fp32 [⌈n/64⌉] (uint8 with double quant), ``<m>.weight.quant_map`` fp32 [16];
- ``<m>.weight.quant_state.bitsandbytes__nf4``: uint8 bytes of a JSON with quant_type, blocksize, dtype, shape
  (and nested_blocksize, nested_dtype, nested_offset with double quant);
- with double quant: ``<m>.weight.nested_absmax`` fp32, ``<m>.weight.nested_quant_map`` fp32 [256].
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging

import torch

from weightsmith.compress.quantize import chunks
from weightsmith.compress.quantize.schemes import NF4

QUANT_STATE = "weight.quant_state.bitsandbytes__nf4"


def _bnb():
    """bitsandbytes' functional module, imported on first use: its start-up chatter about optional GPU kernels is
    silenced, and the ``torch.compile`` calls its import makes are deferred (``_compile_on_first_call``)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with (
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.redirect_stdout(io.StringIO()),
        _compile_on_first_call(),
    ):
        import bitsandbytes.functional as F
    return F


@contextlib.contextmanager
def _compile_on_first_call():
    """While bitsandbytes is imported, ``torch.compile(fn)`` returns a wrapper that compiles ``fn`` the first time it
    is called. bitsandbytes compiles its CPU fallbacks as it defines them, and the first ``torch.compile`` loads
    torch's compiler stack (dynamo, inductor): 0.8 s of an 8 s NF4 quantization of a 1 GB model, for functions a
    quantization never calls (``quantize_4bit``'s CPU kernel is eager; dequantization is weightsmith's). Whoever
    calls them later gets them compiled, as bitsandbytes meant; ``torch.compile`` is restored on exit."""
    compile_now = torch.compile

    def compile_later(model=None, **options):
        if model is None:  # the decorator form: torch.compile(**options)(fn)
            return lambda fn: compile_later(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = compile_later  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = compile_now


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """NF4 as ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` computes it on the CPU: per block of ``blocksize`` values (over the flattened weight, in
    float32), absmax a = max|w|, x = clamp(w · (1 / max(a, 10⁻³⁸)), −1, 1) (the last, partial block: w / a), and the
    code of x is the nearest of the 16 NF4 levels (the quantiles of N(0, 1) scaled to [−1, 1]; Dettmers et al. 2023,
    "QLoRA"), a tie going to the lower level; two codes a byte, the first in the high nibble. Double quant stores the
    absmax as 8-bit codes of (a − mean a) in blocks of 256 with bitsandbytes' dynamic map.

    ``w`` is quantized in its own dtype, as transformers does when it loads a checkpoint with ``load_in_4bit``.
    Returns the stored tensors keyed by the suffix after the module name, serialised by bitsandbytes'
    ``QuantState.as_dict(packed=True)`` (the serialiser transformers uses).

    The codes and absmax are computed here, bit for bit as bitsandbytes' kernel computes them (the tests compare),
    a slice of whole blocks at a time (``chunks``), and the code as the count of the 15 midpoints between
    consecutive levels that lie below x: what its ``torch.bucketize`` over those midpoints returns, in half the
    time. bitsandbytes builds the quant state (and double quant) from them, as ``quantize_4bit`` does.
    """
    F = _bnb()
    levels = F.get_4bit_type("nf4", device="cpu")  # float32, ascending
    midpoints = ((levels[:-1] + levels[1:]) / 2).tolist()  # float32 values, compared exactly
    flat = w.contiguous().reshape(-1)
    sliced = [
        _nf4_codes(flat[a * blocksize : b * blocksize].float(), blocksize, midpoints)
        for a, b in chunks.spans(-(-flat.numel() // blocksize), blocksize)
    ]
    packed = torch.cat([codes for codes, _ in sliced]).unsqueeze(1)
    absmax = torch.cat([block_max for _, block_max in sliced])
    common = {"shape": w.shape, "dtype": w.dtype, "blocksize": blocksize, "code": levels, "quant_type": "nf4"}
    if double_quant:
        offset = absmax.mean()
        nested, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state = F.QuantState(absmax=nested, offset=offset, state2=state2, **common)
    else:
        state = F.QuantState(absmax=absmax, **common)
    out = {"weight": packed}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def _nf4_codes(x: torch.Tensor, blocksize: int, midpoints: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 values (whole blocks, the last possibly partial) → their packed codes (uint8, two a byte) and the
    absmax of each block (see ``quantize_nf4``)."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = chunks.absmax(blocks, dim=1)
    scaled = torch.zeros(n + n % 2, dtype=torch.float32)  # an odd count gets one more value, 0, as bitsandbytes pads
    torch.mul(blocks, (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), out=scaled[:full].view(-1, blocksize))
    if full < n:
        tail = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.unsqueeze(0)])
        torch.div(x[full:], tail, out=scaled[full:n])
    scaled.clamp_(-1, 1)
    codes = (scaled > midpoints[0]).to(torch.uint8)
    for midpoint in midpoints[1:]:
        codes += scaled > midpoint
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    state: dict,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """W = quant_map[code] · absmax[block], codes read two a byte (high nibble first) and blocks of ``blocksize``
    taken over the flattened tensor, as quantize_4bit forms them. With double quant the absmax is first
    nested_quant_map[absmax] · nested_absmax[block of nested_blocksize] + nested_offset.

    Pure torch (bitsandbytes' generic dequantization). bitsandbytes 0.50's native CPU kernel instead assumes each
    row holds whole blocks and gets weights whose width is not a multiple of the block size wrong.
    """
    if nested_absmax is not None:
        assert nested_quant_map is not None  # double quant stores both
        nb = state["nested_blocksize"]
        absmax = _blockwise(nested_quant_map.float()[absmax.long()], nested_absmax.float(), nb)
        absmax += float(state["nested_offset"])
    shape, blocksize = tuple(state["shape"]), state["blocksize"]
    n = 1
    for d in shape:
        n *= d
    byte = torch.arange(256)
    pairs = quant_map.float()[torch.stack([byte >> 4, byte & 0xF], dim=1)]  # (256, 2): a byte's two values
    codes, scales = packed.reshape(-1), absmax.float()
    out = torch.empty(n, dtype=getattr(torch, state["dtype"]))
    for first, end in chunks.spans(-(-n // blocksize), blocksize):  # whole blocks (an even number of values)
        start, stop = first * blocksize, min(end * blocksize, n)
        values = pairs.index_select(0, codes[start // 2 : (stop + 1) // 2].long()).reshape(-1)[: stop - start]
        out[start:stop] = _blockwise(values, scales[first:end], blocksize)
    return out.reshape(shape)


def _blockwise(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) × scales (⌈n/blocksize⌉,), block by block; the last block may be partial."""
    n = values.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(values, (0, pad)).reshape(-1, blocksize)  # (blocks, blocksize)
    return (blocks * scales.reshape(-1, 1)).reshape(-1)[:n]


def dequantize_module(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A module's stored tensors (suffix → tensor) → its float weight, in the dtype its quant state records."""
    return dequantize_nf4(
        parts["weight"],
        parts["weight.absmax"],
        parts["weight.quant_map"],
        read_quant_state(parts[QUANT_STATE]),
        parts.get("weight.nested_absmax"),
        parts.get("weight.nested_quant_map"),
    )


def read_quant_state(raw: torch.Tensor) -> dict:
    """The JSON inside ``<m>.weight.quant_state.bitsandbytes__nf4`` (uint8 bytes)."""
    return json.loads(bytes(raw.tolist()).decode("utf-8"))


def check(scheme: NF4, name: str, shape: tuple[int, ...]) -> str | None:
    """Why ``name`` cannot be quantized with ``scheme``, or None (bitsandbytes pads the last block itself)."""
    numel = shape[0] * shape[1]
    if numel % 2:
        return f"{name}: {numel} elements cannot be packed two to a byte"
    return None


def quantize_module(scheme: NF4, w: torch.Tensor) -> dict[str, torch.Tensor]:
    return quantize_nf4(w, scheme.group_size, scheme.double_quant)


# The 16 NF4 levels and the 256-entry dynamic map of double quantization, both stored as float32.
_QUANT_MAP_SIZE, _NESTED_MAP_SIZE = 16, 256
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256 with double quant


def describe(
    scheme: NF4, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
    """The (shape, dtype) of each tensor ``quantize_module`` stores for a weight of ``shape`` and ``dtype``, in the
    same order, without computing anything.

    One exception: with double quant the quant state's JSON holds ``nested_offset`` (the mean block absmax), whose
    decimal form has a data-dependent length; its shape is given as None.
    """
    n = 1
    for d in shape:
        n *= d
    blocks = -(-n // scheme.group_size)
    out: dict[str, tuple[tuple[int, ...] | None, torch.dtype]] = {
        "weight": ((-(-n // 2), 1), torch.uint8),  # two codes a byte
        "weight.absmax": ((blocks,), torch.uint8 if scheme.double_quant else torch.float32),
        "weight.quant_map": ((_QUANT_MAP_SIZE,), torch.float32),
    }
    if scheme.double_quant:
        out["weight.nested_absmax"] = ((-(-blocks // NESTED_BLOCKSIZE),), torch.float32)
        out["weight.nested_quant_map"] = ((_NESTED_MAP_SIZE,), torch.float32)
        out[QUANT_STATE] = (None, torch.uint8)
    else:
        # bitsandbytes' QuantState.as_dict(packed=True) serialises exactly this with json.dumps
        state = {
            "quant_type": "nf4",
            "blocksize": scheme.group_size,
            "dtype": str(dtype).removeprefix("torch."),
            "shape": list(shape),
        }
        out[QUANT_STATE] = ((len(json.dumps(state).encode()),), torch.uint8)
    return out


STORED_SUFFIXES = (
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    QUANT_STATE,
)


def quantization_config(scheme: NF4, ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` as transformers' ``BitsAndBytesConfig.to_dict()`` writes it for a 4-bit
    NF4 model. ``llm_int8_skip_modules`` lists every module left in float: given a list, transformers converts all
    other nn.Linear modules to Linear4bit on load (and adds no default skips of its own)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": scheme.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": scheme.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(ignore),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def scheme_from_config(qc: dict, blocksize: int = 64) -> NF4 | None:
    """The NF4 scheme a bitsandbytes ``quantization_config`` describes, or None (8-bit or FP4 are not read)."""
    if not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        return None
    return NF4(
        group_size=blocksize,
        double_quant=bool(qc.get("bnb_4bit_use_double_quant")),
        compute_dtype=qc.get("bnb_4bit_compute_dtype") or "float32",
    )
