"""``dequantize``: a compressed-tensors or bitsandbytes NF4 checkpoint back to a float one, streamed; and
``open_dequantized``, the same as a lazy view (``DequantizedView``) that streams into the next step.

>>> ws.dequantize("llama-nf4", "llama-float")                     # doctest: +SKIP
>>> ws.lora.merge(open_dequantized("llama-nf4"), ["adapter"], "merged")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, CheckpointView, TensorInfo, TensorSource, provenance_step
from weightsmith.compress.quantize import nf4
from weightsmith.compress.quantize.detect import QuantizedLayout, detect
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import CheckpointError, IncompatibleError
from weightsmith.report import Report
from weightsmith.stream import Written, stream
from weightsmith.units import format_size, parse_dtype


class DequantizedView(CheckpointView):
    """A quantized checkpoint as the float checkpoint it stands for: a quantized module's stored tensors appear as
    one dequantized ``<m>.weight`` (computed when read), every other tensor passes through (its bytes copied as
    stored); ``config`` without ``quantization_config``. A view like the others: inspect, diff, a fold, a
    quantization or a GGUF export stream from it."""

    def __init__(self, source: TensorSource, layout: QuantizedLayout):
        if layout.scheme is None:
            raise CheckpointError(
                f"{source.path}: quantized with {layout.method} in a form weightsmith does not read "
                f"(supported: compressed-tensors int8/int4/fp8, bitsandbytes NF4)"
            )
        self.layout, self.scheme = layout, layout.scheme
        super().__init__(source, provenance_step("dequantize", {"scheme": self.scheme.to_dict()}, [source]))
        if source.config is not None:
            self.config = {k: v for k, v in source.config.items() if k != "quantization_config"}
        owner = {name: module for module, parts in layout.modules.items() for name in parts.values()}
        self._infos: dict[str, TensorInfo] = {}
        self._module_of: dict[str, str] = {}
        for name in source:
            module = owner.get(name)
            if module is None:
                self._infos[name] = source.info(name)
            elif f"{module}.weight" not in self._infos:
                weight = f"{module}.weight"
                shape, dtype = self._float_info(module)
                self._infos[weight] = TensorInfo(weight, shape, dtype, source.info(name).file)
                self._module_of[weight] = module
        self._order = list(self._infos)

    def _float_info(self, module: str) -> tuple[tuple[int, ...], torch.dtype]:
        parts = self.layout.modules[module]
        if self.layout.method == "bitsandbytes":
            state = nf4.read_quant_state(self.source[parts[nf4.QUANT_STATE]])
            return tuple(state["shape"]), getattr(torch, state["dtype"])
        dtype = self.source.info(parts["weight_scale"]).dtype
        if "weight_shape" in parts:
            return tuple(int(d) for d in self.source[parts["weight_shape"]].tolist()), dtype
        return self.source.info(parts["weight"]).shape, dtype

    def __getitem__(self, name: str) -> Tensor:
        module = self._module_of.get(name)
        if module is None:
            if name not in self._infos:
                raise KeyError(name)
            return self.source[name]
        parts = {suffix: self.source[full] for suffix, full in self.layout.modules[module].items()}
        return self.layout.codec.dequantize_module(parts)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def is_quantized(self, name: str) -> bool:
        """True for a weight dequantized from a quantized module (False for tensors stored as floats)."""
        return name in self._module_of

    def _changed(self, name: str) -> bool:
        return self.is_quantized(name)


def dequantized(ckpt: TensorSource) -> TensorSource:
    """``ckpt`` itself when it is float, else its ``DequantizedView`` (refused for a form weightsmith cannot read)."""
    layout = detect(ckpt)
    return ckpt if layout is None else DequantizedView(ckpt, layout)


def float_view(ckpt: TensorSource) -> TensorSource:
    """Like ``dequantized``, but a quantization weightsmith does not read passes through as stored (for inspect,
    diff and export, which can still show or copy its tensors)."""
    layout = detect(ckpt)
    return ckpt if layout is None or layout.scheme is None else DequantizedView(ckpt, layout)


def open_dequantized(src: TensorSource | str | os.PathLike) -> DequantizedView:
    """The float checkpoint a quantized ``src`` stands for, as a lazy read-only tensor dict; refused (now) when
    ``src`` is not quantized or quantized in a form weightsmith does not read."""
    ckpt = as_checkpoint(src)
    layout = detect(ckpt)
    if layout is None:
        raise IncompatibleError(f"{ckpt.path}: not quantized (no quantization_config and no quantized tensors)")
    return DequantizedView(ckpt, layout)


def dequantize(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Write the float checkpoint a quantized one stands for: W = q·s (int8) or bitsandbytes' ``dequantize_4bit``
    (NF4), in the original dtype recorded by the format (or ``dtype``); ``quantization_config`` is dropped.

    Useful to merge an adapter into a quantized base, or to diff against the source.

    >>> ws.dequantize("llama-nf4", "llama-float")  # doctest: +SKIP
    """
    view = open_dequantized(src)  # refuses formats it cannot read, before anything is written
    ckpt, layout = view.source, view.layout
    target = parse_dtype(dtype)

    def summary(written: Written) -> dict:
        return dict(
            source=str(ckpt.path),
            scheme=view.scheme.label,
            method=layout.method,
            dequantized_tensors=len(layout.modules),
            bytes_in=ckpt.nbytes,
            bytes_out=written.bytes,
            size_in=format_size(ckpt.nbytes),
            size_out=format_size(written.bytes),
            shards=written.shards,
        )

    return stream(
        view,
        out,
        operation="dequantize",
        params={"dtype": str(target) if target else None, "scheme": view.scheme.to_dict()},
        inputs=[ckpt],
        summary=summary,
        dtype=target,
        shard_size=shard_size,
        force=force,
    )
