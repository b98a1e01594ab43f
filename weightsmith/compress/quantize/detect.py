"""Recognise a quantized checkpoint (compressed-tensors int8/int4/fp8, bitsandbytes NF4): ``detect`` gives its
``QuantizedLayout`` (scheme, format, each quantized module's stored tensors); ``describe`` gives inspect's facts.
The float checkpoint it stands for is ``dequantize.DequantizedView``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from weightsmith.checkpoint import TensorSource
from weightsmith.compress.quantize import int8, nf4
from weightsmith.compress.quantize.codecs import COMPRESSED_TENSORS, REGISTRY
from weightsmith.compress.quantize.schemes import NF4, Int4, Scheme


@dataclass
class QuantizedLayout:
    """What a quantized checkpoint holds: its scheme, format and, per quantized module, its stored tensor names."""

    scheme: Scheme | None  # None: a quantization weightsmith recognises but does not read (e.g. bnb 8-bit, FP8)
    method: str  # "compressed-tensors", "bitsandbytes", or the config's quant_method
    modules: dict[str, dict[str, str]] = field(default_factory=dict)  # module → {suffix: tensor name}
    ignore: list[str] = field(default_factory=list)

    @property
    def codec(self) -> ModuleType:
        if self.scheme is not None:
            return REGISTRY[type(self.scheme)]
        return nf4 if self.method == "bitsandbytes" else int8


def _group(ckpt: TensorSource, marker: str, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    modules = {}
    for name in ckpt:
        if name.endswith("." + marker):
            module = name[: -len(marker) - 1]
            modules[module] = {s: f"{module}.{s}" for s in suffixes if f"{module}.{s}" in ckpt}
    return modules


def detect(ckpt: TensorSource) -> QuantizedLayout | None:
    """The quantization layout of ``ckpt``, from config.json's ``quantization_config`` or, for a bare weight file,
    from its tensor names; None for a float checkpoint."""
    qc = (ckpt.config or {}).get("quantization_config")
    names = list(ckpt)
    has_nf4 = any(n.endswith("." + nf4.QUANT_STATE) for n in names)
    has_ct = any(n.endswith(".weight_scale") for n in names)
    if qc is None and not (has_nf4 or has_ct):
        return None
    method = (qc or {}).get("quant_method") or ("bitsandbytes" if has_nf4 else "compressed-tensors")
    scheme: Scheme | None = None
    if method == "bitsandbytes":
        modules = _group(ckpt, nf4.QUANT_STATE, nf4.STORED_SUFFIXES)
        if modules:
            first = nf4.read_quant_state(ckpt[next(iter(modules.values()))[nf4.QUANT_STATE]])
            scheme = (
                nf4.scheme_from_config(
                    qc
                    or {
                        "load_in_4bit": True,
                        "bnb_4bit_quant_type": first["quant_type"],
                        "bnb_4bit_use_double_quant": "nested_offset" in first,
                    },
                    blocksize=first["blocksize"],
                )
                if first["quant_type"] == "nf4"
                else None
            )
        ignore = list((qc or {}).get("llm_int8_skip_modules") or [])
        return QuantizedLayout(scheme, method, modules, ignore)
    if method == "compressed-tensors":
        modules = _group(ckpt, "weight_scale", int8.STORED_SUFFIXES)
        scheme = _ct_scheme(qc) if qc else _int8_from_tensors(ckpt, modules)
        return QuantizedLayout(scheme, method, modules, list((qc or {}).get("ignore") or []))
    return QuantizedLayout(None, method)


def _ct_scheme(qc: dict) -> Scheme | None:
    """The scheme of a compressed-tensors quantization_config, from the first codec that reads it."""
    for codec in COMPRESSED_TENSORS:
        scheme = codec.scheme_from_config(qc)
        if scheme is not None:
            return scheme
    return None


def _int8_from_tensors(ckpt: TensorSource, modules: dict[str, dict[str, str]]):
    if not modules:
        return None
    parts = next(iter(modules.values()))
    weight_only = "weight_packed" in parts
    if not weight_only and ("weight" not in parts or ckpt.info(parts["weight"]).dtype != torch.int8):
        return None
    scale = ckpt.info(parts["weight_scale"]).shape
    width = int(ckpt[parts["weight_shape"]][1]) if weight_only else ckpt.info(parts["weight"]).shape[1]
    return int8.Int8(weight_only=weight_only, group_size=None if scale[1] == 1 else width // scale[1])


def describe(ckpt: TensorSource) -> dict | None:
    """inspect's facts on a quantized checkpoint: scheme, bits, groups, ignored modules, compression ratio."""
    layout = detect(ckpt)
    if layout is None:
        return None
    facts: dict[str, Any] = {
        "method": layout.method,
        "scheme": layout.scheme.label if layout.scheme else None,
        "quantized_modules": len(layout.modules),
        "ignored_modules": layout.ignore,
    }
    if layout.scheme is None:
        return facts
    from weightsmith.compress.quantize.dequantize import DequantizedView  # it builds on this module

    view = DequantizedView(ckpt, layout)
    facts.update(
        bits=layout.scheme.bits,
        group_size=layout.scheme.group_size,
        format=layout.codec.format_name(layout.scheme) if layout.method != "bitsandbytes" else "nf4",
        float_bytes=view.nbytes,
        stored_bytes=ckpt.nbytes,
        compression_ratio=round(view.nbytes / ckpt.nbytes, 3) if ckpt.nbytes else None,
    )
    if isinstance(layout.scheme, NF4):
        facts["double_quant"] = layout.scheme.double_quant
    if isinstance(layout.scheme, Int4):
        facts["symmetric"] = not layout.scheme.asymmetric
    return facts
