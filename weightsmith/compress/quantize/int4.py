"""int4 weights (W4A16) in compressed-tensors' "pack-quantized" layout: what llm-compressor's W4A16 and GPTQ recipes
write and vLLM (Marlin/Machete kernels) and transformers (compressed-tensors installed) load.

Per quantized Linear ``<m>`` (W [out, in]), g = group size (or in for per-channel):
- ``<m>.weight_packed`` int32 [out, ⌈in/8⌉]: codes q ∈ [−8, 7] offset by +8, eight per int32, the first in the
  lowest four bits (compressed-tensors' ``pack_to_int32(q, 4)``);
- ``<m>.weight_scale`` [out, in/g] in the weight's dtype;
- ``<m>.weight_shape`` int64 [2];
- asymmetric only: ``<m>.weight_zero_point`` int32 [⌈out/8⌉, in/g]: zero points z ∈ [−8, 7] packed the same way
  along the output dimension (``pack_to_int32(z, 4, packed_dim=0)``).
W ≈ (q − z)·s.
"""

from __future__ import annotations

import sys

import torch

from weightsmith.compress.quantize import chunks
from weightsmith.compress.quantize.int8 import ct_args, ct_quantization_config
from weightsmith.compress.quantize.schemes import Int4

QMIN, QMAX = -8, 7


def quantize_int4(
    w: torch.Tensor, group_size: int | None = None, asymmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest int4 per group of ``group_size`` inputs of each row (per row when None), with the min-max
    ranges compressed-tensors' observer computes (and GPTQ's quantizer: Frantar et al. 2023, "GPTQ"):

    symmetric:  s = max|W| / 7.5,                q = clamp(round(W / s), −8, 7)
    asymmetric: s = (max(W, 0) − min(W, 0)) / 15, z = clamp(round(−8 − min(W, 0) / s), −8, 7),
                q = clamp(round(W / s + z), −8, 7)

    s is rounded to ``w``'s dtype before q is computed (what a loader multiplies by); an all-zero group gets s = 1.
    Returns q int8 [out, in], s [out, in/g] in ``w``'s dtype, z int8 [out, in/g] or None.
    """
    out_features, in_features = w.shape
    g = group_size or in_features
    x = w.to(torch.float32, copy=True).reshape(out_features, in_features // g, g)  # (out, groups, g): ours to change
    lo = x.amin(dim=-1).clamp(max=0)
    hi = x.amax(dim=-1).clamp(min=0)
    if asymmetric:
        scale = (hi - lo) / (QMAX - QMIN)
    else:
        scale = torch.maximum(-lo, hi) / ((QMAX - QMIN) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(w.dtype)
    s = scale.float()
    zero = None
    y = x.div_(s.unsqueeze(-1))  # in place from here: one fp32 copy of W in all
    if asymmetric:
        zero = torch.round((QMIN - lo / s).clamp(QMIN, QMAX)).to(torch.int8)
        y.add_(zero.float().unsqueeze(-1))
    q = y.clamp_(QMIN, QMAX).round_().to(torch.int8)
    return q.reshape(out_features, in_features), scale, zero


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """W = (q − z)·s, broadcast over each group; fp32 arithmetic, cast once to ``dtype`` (default s's dtype)."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    y = q.float().reshape(out_features, groups, in_features // groups)  # a fresh copy, changed in place
    if zero is not None:
        y.sub_(zero.float().unsqueeze(-1))
    return y.mul_(scale.float().unsqueeze(-1)).reshape(out_features, in_features).to(dtype or scale.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [rows, cols] in [−8, 7] → int32 [rows, ⌈cols/8⌉]: q + 8 in four bits, code j of a word at bits
    4j…4j+3 (little-endian nibbles), rows padded with zero nibbles; compressed-tensors' ``pack_to_int32(q, 4)``.

    Two codes per byte (the even one in the low nibble), four bytes per word read as one little-endian int32: byte
    operations on the codes, no 64-bit temporaries."""
    rows, cols = q.shape
    u = (q + 8).to(torch.uint8)  # [0, 15]
    pad = -cols % 8
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # zero nibbles, as compressed-tensors pads
    byte = u[:, 0::2] | (u[:, 1::2] << 4)  # [rows, cols/2]
    # viewed flat: a one-row tensor may keep any stride on its row dimension, which a dtype view refuses
    return _as_little_endian(byte.contiguous().reshape(-1)).view(torch.int32).reshape(rows, byte.shape[1] // 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``pack_int4``: int32 [rows, ⌈cols/8⌉] → int8 codes ``shape``."""
    rows, cols = shape
    byte = _as_little_endian(packed.contiguous().view(torch.uint8)).reshape(rows, -1)
    u = torch.stack([byte & 0xF, byte >> 4], dim=-1).reshape(rows, -1)
    return u[:, :cols].to(torch.int8) - 8


def _as_little_endian(byte: torch.Tensor) -> torch.Tensor:
    """``byte`` as is: the int32 ↔ byte views above assume a little-endian machine (every platform torch ships)."""
    if sys.byteorder != "little":
        raise NotImplementedError("int4 packing assumes a little-endian machine")
    return byte


# -- the format -------------------------------------------------------------------------------------------------


def check(scheme: Int4, name: str, shape: tuple[int, ...]) -> str | None:
    """Why ``name`` cannot be quantized with ``scheme``, or None."""
    if scheme.group_size and shape[1] % scheme.group_size:
        return (
            f"{name}: width {shape[1]} is not a multiple of group size {scheme.group_size} "
            f"(choose a group size that divides it, or group_size 0 for per-channel scales)"
        )
    return None


def quantize_module(scheme: Int4, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Linear weight [out, in] → its stored tensors, keyed by the suffix after the module name."""
    q, scale, zero = chunks.by_rows(lambda rows: quantize_int4(rows, scheme.group_size, scheme.asymmetric), w)
    return pack_module(q, scale, zero)


def pack_module(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Codes [out, in], scales and zero points (as ``quantize_int4`` returns them) → the stored tensors."""
    parts = {
        "weight_packed": pack_int4(q),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
    }
    if zero is not None:
        parts["weight_zero_point"] = pack_int4(zero.t().contiguous()).t().contiguous()
    return parts


def describe(
    scheme: Int4, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of each tensor ``quantize_module`` stores, in the same order, without computing."""
    out_features, in_features = shape
    groups = in_features // (scheme.group_size or in_features)
    parts = {
        "weight_packed": ((out_features, -(-in_features // 8)), torch.int32),
        "weight_scale": ((out_features, groups), dtype),
        "weight_shape": ((2,), torch.int64),
    }
    if scheme.asymmetric:
        parts["weight_zero_point"] = ((-(-out_features // 8), groups), torch.int32)
    return parts


def dequantize_module(parts: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A module's stored tensors → its float weight, in ``dtype`` (default the scale's)."""
    rows, cols = (int(d) for d in parts["weight_shape"].tolist())
    q = unpack_int4(parts["weight_packed"], (rows, cols))
    zero = None
    if "weight_zero_point" in parts:
        groups = parts["weight_scale"].shape[1]
        zero = unpack_int4(parts["weight_zero_point"].t().contiguous(), (groups, rows)).t()
    return dequantize_int4(q, parts["weight_scale"], zero, dtype)


def format_name(scheme: Int4) -> str:
    return "pack-quantized"


def quantization_config(scheme: Int4, ignore: list[str]) -> dict:
    weights = ct_args(
        "group" if scheme.group_size else "channel",
        scheme.group_size,
        False,
        num_bits=4,
        symmetric=not scheme.asymmetric,
    )
    if scheme.gptq is not None and scheme.gptq.act_order:
        weights["actorder"] = "weight"  # compressed-tensors' name for act-order with static groups: no g_idx
    return ct_quantization_config("pack-quantized", weights, None, ignore)


def scheme_from_config(qc: dict) -> Int4 | None:
    """The Int4 scheme a compressed-tensors ``quantization_config`` describes, or None."""
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        return None
    weights = groups[0].get("weights") or {}
    fmt = groups[0].get("format") or qc.get("format")
    if weights.get("num_bits") != 4 or weights.get("type") != "int" or fmt != "pack-quantized":
        return None
    if weights.get("strategy") not in ("channel", "group") or groups[0].get("input_activations") is not None:
        return None
    group_size = weights.get("group_size") if weights.get("strategy") == "group" else None
    return Int4(group_size=group_size, asymmetric=not weights.get("symmetric", True))
