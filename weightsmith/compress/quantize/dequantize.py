"""``dequantize``: a compressed-tensors or bitsandbytes NF4 checkpoint back to a float one, streamed; and
``open_dequantized``, the same as a lazy view (``DequantizedView``) that streams into the next step.

>>> ws.dequantize("llama-nf4", "llama-float")                     # doctest: +SKIP
>>> ws.lora.merge(open_dequantized("llama-nf4"), ["adapter"], "merged")  # doctest: +SKIP
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, CheckpointView, TensorInfo, provenance_step
from weightsmith.compress.quantize.detect import FloatView, QuantizedLayout, detect
from weightsmith.compress.quantize.schemes import Scheme
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import IncompatibleError
from weightsmith.report import Report
from weightsmith.stream import Written, stream
from weightsmith.units import format_size, parse_dtype


class DequantizedView(CheckpointView):
    """A quantized checkpoint as the float checkpoint it stands for: quantized modules' weights dequantized when
    read (their stored parts hidden), everything else passed through (its bytes copied as stored); ``config``
    without ``quantization_config``. A view like the others: a fold or a quantization streams from it."""

    def __init__(self, source: Checkpoint, layout: QuantizedLayout):
        self.layout = layout
        self.floats = FloatView(source, layout)  # refuses formats it cannot read
        assert layout.scheme is not None  # FloatView refused a layout without one
        self.scheme: Scheme = layout.scheme
        super().__init__(source, provenance_step("dequantize", {"scheme": self.scheme.to_dict()}, [source]))
        self._order = list(self.floats)
        self.config = self.floats.config

    def __getitem__(self, name: str) -> Tensor:
        return self.floats[name]

    def info(self, name: str) -> TensorInfo:
        return self.floats.info(name)

    def _changed(self, name: str) -> bool:
        return self.floats.is_quantized(name)


def dequantized(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself when it is float, else its ``DequantizedView``."""
    layout = detect(ckpt)
    return ckpt if layout is None else DequantizedView(ckpt, layout)


def open_dequantized(src: Checkpoint | str | os.PathLike) -> DequantizedView:
    """The float checkpoint a quantized ``src`` stands for, as a lazy read-only tensor dict; refused (now) when
    ``src`` is not quantized or quantized in a form weightsmith does not read."""
    ckpt = as_checkpoint(src)
    layout = detect(ckpt)
    if layout is None:
        raise IncompatibleError(f"{ckpt.path}: not quantized (no quantization_config and no quantized tensors)")
    return DequantizedView(ckpt, layout)


def dequantize(
    src: Checkpoint | str | os.PathLike,
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
