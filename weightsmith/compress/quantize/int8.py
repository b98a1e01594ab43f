"""int8 weights in the compressed-tensors layout (what llm-compressor writes and vLLM/transformers load).

Per quantized Linear ``<m>`` (W [out, in]):
- W8A8, format "int-quantized": ``<m>.weight`` int8 [out, in], ``<m>.weight_scale`` [out, 1] (or [out, in/g]).
- W8A16, format "pack-quantized": ``<m>.weight_packed`` int32 [out, ⌈in/4⌉] (four int8 offset by +128, the first
  in the low byte), ``<m>.weight_shape`` int64 [2], ``<m>.weight_scale`` as above.
The scale has the weight's float dtype, as compressed-tensors initialises it. Symmetric: no zero point is stored.
"""

from __future__ import annotations

from importlib import metadata

import torch

from weightsmith.compress.quantize import chunks
from weightsmith.compress.quantize.schemes import Int8

QMAX = 127  # symmetric range [-127, 127]: -128 is never produced, so negating a weight negates its code


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8: s = max|W| / 127 over each output row (or each group of ``group_size`` inputs of a row),
    q = clamp(round(W / s), −127, 127); W ≈ q·s. (Jacob et al. 2018; LLM.int8's vector-wise absmax.)

    Returns q int8 [out, in] and s [out, 1] (per channel) or [out, in/g] in ``w``'s dtype. s is rounded to that
    dtype before q is computed, so q·s is exactly what a loader reconstructs. An all-zero row or group gets s = 1/127
    (its codes are 0). compressed-tensors' min-max observer divides by 127.5 and clips the extreme to 127; dividing
    by 127 represents the extreme exactly.
    """
    out_features, in_features = w.shape
    g = group_size or in_features
    # (out, groups, g) in fp32 whatever the storage dtype: our own copy, divided, rounded and clamped in place
    x = w.to(torch.float32, copy=True).reshape(out_features, in_features // g, g)
    amax = chunks.absmax(x, dim=-1)  # max |W| per (out, group)
    scale = (torch.where(amax > 0, amax, torch.ones_like(amax)) / QMAX).to(w.dtype)
    q = x.div_(scale.float().unsqueeze(-1)).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q.reshape(out_features, in_features), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W = q · s, s broadcast over each row or group; fp32 product, cast once to ``dtype`` (default s's dtype)."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(out_features, groups, in_features // groups).mul_(scale.float().unsqueeze(-1))
    return w.reshape(out_features, in_features).to(dtype or scale.dtype)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] → int32 [out, ⌈in/4⌉]: codes offset by +128 to bytes, four bytes per little-endian int32 (the
    first code in the low byte), rows padded with zero bytes; compressed-tensors' ``pack_to_int32`` for 8 bits."""
    out_features, in_features = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    pad = -in_features % 4
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    # explicit little-endian assembly: independent of the host's byte order
    b = u.reshape(out_features, -1, 4).to(torch.int64)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int8(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``pack_int8``: int32 [out, ⌈in/4⌉] → int8 ``shape``."""
    out_features, in_features = shape
    word = packed.to(torch.int64) & 0xFFFFFFFF
    b = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).reshape(out_features, -1)
    return (b[:, :in_features] - 128).to(torch.int8)


# -- the format: what one module's tensors are, and the config that describes them ----------------------------------


def check(scheme: Int8, name: str, shape: tuple[int, ...]) -> str | None:
    """Why ``name`` cannot be quantized with ``scheme``, or None."""
    if scheme.group_size and shape[1] % scheme.group_size:
        return f"{name}: width {shape[1]} is not a multiple of group size {scheme.group_size}"
    return None


def quantize_module(scheme: Int8, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Linear weight [out, in] → its stored tensors, keyed by the suffix after the module name."""
    q, scale = chunks.by_rows(lambda rows: quantize_int8(rows, scheme.group_size), w)
    if scheme.weight_only:
        return {
            "weight_packed": pack_int8(q),
            "weight_scale": scale,
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
        }
    return {"weight": q, "weight_scale": scale}


def describe(
    scheme: Int8, shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of each tensor ``quantize_module`` stores for a weight of ``shape`` and ``dtype``, in the
    same order, without computing anything."""
    out_features, in_features = shape
    scale = ((out_features, in_features // (scheme.group_size or in_features)), dtype)
    if scheme.weight_only:
        return {
            "weight_packed": ((out_features, -(-in_features // 4)), torch.int32),
            "weight_scale": scale,
            "weight_shape": ((2,), torch.int64),
        }
    return {"weight": ((out_features, in_features), torch.int8), "weight_scale": scale}


def dequantize_module(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A module's stored tensors (suffix → tensor) → its float weight, in the scale's dtype."""
    if "weight_packed" in parts:
        rows, cols = (int(d) for d in parts["weight_shape"].tolist())
        shape = (rows, cols)
        q = unpack_int8(parts["weight_packed"], shape)
    else:
        q = parts["weight"]
    return dequantize_int8(q, parts["weight_scale"])


STORED_SUFFIXES = ("weight", "weight_scale", "weight_packed", "weight_shape", "weight_zero_point")


def ct_args(
    strategy: str | None,
    group_size: int | None,
    dynamic: bool,
    *,
    num_bits: int = 8,
    kind: str = "int",
    symmetric: bool = True,
) -> dict:
    """One compressed-tensors ``QuantizationArgs`` as ``update_config`` serialises it."""
    return {
        "dynamic": dynamic,
        "group_size": group_size,
        "num_bits": num_bits,
        "strategy": strategy,
        "symmetric": symmetric,
        "type": kind,
    }


def format_name(scheme: Int8) -> str:
    return "pack-quantized" if scheme.weight_only else "int-quantized"


def ct_quantization_config(fmt: str, weights: dict, input_activations: dict | None, ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for one compressed-tensors group targeting every nn.Linear, with the
    fields compressed-tensors' ``ModelCompressor.update_config`` writes (``ignore`` lists exact module names)."""
    group = {
        "format": fmt,
        "input_activations": input_activations,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": weights,
    }
    return {
        "config_groups": {"group_0": group},
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        **_schema_version(),
    }


def quantization_config(scheme: Int8, ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for ``scheme``, as compressed-tensors writes it."""
    weights = ct_args("group" if scheme.group_size else "channel", scheme.group_size, False)
    acts = None if scheme.weight_only else ct_args("token", None, True)
    return ct_quantization_config(format_name(scheme), weights, acts, ignore)


def _schema_version() -> dict[str, str]:
    """``{"version": …}`` as compressed-tensors' own ``update_config`` writes it: the installed compressed-tensors'
    version, read from the package metadata (no import). Where compressed-tensors is not installed the key is left
    out: its loader (and transformers' and vLLM's through it) reads "version" only to report it, and a config
    without it loads the same."""
    try:
        return {"version": metadata.version("compressed-tensors")}
    except metadata.PackageNotFoundError:
        return {}


def scheme_from_config(qc: dict) -> Int8 | None:
    """The Int8 scheme a compressed-tensors ``quantization_config`` describes, or None if it is not one we read."""
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        return None
    weights = groups[0].get("weights") or {}
    fmt = groups[0].get("format") or qc.get("format")
    if weights.get("num_bits") != 8 or weights.get("type") != "int" or not weights.get("symmetric", True):
        return None
    if fmt not in ("int-quantized", "pack-quantized") or weights.get("strategy") not in ("channel", "group"):
        return None
    group_size = weights.get("group_size") if weights.get("strategy") == "group" else None
    return Int8(group_size=group_size, weight_only=groups[0].get("input_activations") is None)
