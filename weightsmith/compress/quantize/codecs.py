"""The codec registry: a scheme's config type → the module that quantizes a weight, describes and checks shapes,
dequantizes and writes the format's ``quantization_config``. ``quantize``, its view and ``detect`` all look here."""

from __future__ import annotations

from types import ModuleType

from weightsmith.compress.quantize import fp8, int4, int8, nf4
from weightsmith.compress.quantize.schemes import FP8, NF4, Int4, Int8

REGISTRY: dict[type, ModuleType] = {Int8: int8, NF4: nf4, Int4: int4, FP8: fp8}
# compressed-tensors codecs, in the order a quantization_config is matched against them
COMPRESSED_TENSORS: tuple[ModuleType, ...] = (int8, int4, fp8)
