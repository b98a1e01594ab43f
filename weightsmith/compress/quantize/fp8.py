"""FP8 (e4m3) weights with per-channel scales and dynamic per-token FP8 activations, in compressed-tensors'
"float-quantized" layout (llm-compressor's FP8_DYNAMIC preset; vLLM runs it with FP8 tensor cores).

Per quantized Linear ``<m>`` (W [out, in]): ``<m>.weight`` float8_e4m3fn [out, in] and ``<m>.weight_scale`` [out, 1]
in the weight's dtype; W ≈ q·s. Activations carry no stored scale: they are quantized per token at run time.
"""

from __future__ import annotations

import torch

from weightsmith.compress.quantize import chunks
from weightsmith.compress.quantize.int8 import ct_args, ct_quantization_config
from weightsmith.compress.quantize.schemes import FP8

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448: e4m3's largest finite value (no infinities)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s = max|W_row| / 448 per output row, q = fp8_e4m3(clamp(W / s, −448, 448)) with round-to-nearest-even by
    torch's cast (Micikevicius et al. 2022, "FP8 formats for deep learning"; compressed-tensors' min-max observer).
    s is rounded to ``w``'s dtype first; an all-zero row gets s = 1. Returns q [out, in] and s [out, 1]."""
    x = w.to(torch.float32, copy=True)  # our own copy: divided and clamped in place
    amax = chunks.absmax(x, dim=1).unsqueeze(1)  # max |W| per row
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(w.dtype)
    q = x.div_(scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W = q·s in fp32, cast once to ``dtype`` (default s's dtype)."""
    return q.float().mul_(scale.float()).to(dtype or scale.dtype)


def check(scheme: FP8, name: str, shape: tuple[int, ...]) -> str | None:
    return None  # any 2-D shape: one scale per row


def quantize_module(scheme: FP8, w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = chunks.by_rows(quantize_fp8, w)
    return {"weight": q, "weight_scale": scale}


def describe(scheme: FP8, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {"weight": (tuple(shape), torch.float8_e4m3fn), "weight_scale": ((shape[0], 1), dtype)}


def dequantize_module(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return dequantize_fp8(parts["weight"], parts["weight_scale"])


def format_name(scheme: FP8) -> str:
    return "float-quantized"


def quantization_config(scheme: FP8, ignore: list[str]) -> dict:
    weights = ct_args("channel", None, False, kind="float")
    acts = ct_args("token", None, True, kind="float")
    return ct_quantization_config("float-quantized", weights, acts, ignore)


def scheme_from_config(qc: dict) -> FP8 | None:
    """The FP8 scheme a compressed-tensors ``quantization_config`` describes, or None."""
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        return None
    weights = groups[0].get("weights") or {}
    fmt = groups[0].get("format") or qc.get("format")
    if weights.get("type") != "float" or weights.get("num_bits") != 8 or fmt != "float-quantized":
        return None
    return FP8() if weights.get("strategy") == "channel" else None
