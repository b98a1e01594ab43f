"""``dequantize``: a compressed-tensors int8 or bitsandbytes NF4 checkpoint back to a float one, streamed."""

from __future__ import annotations

import os

import torch

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, CheckpointWriter, provenance_step
from weightsmith.compress.quantize.detect import FloatView, detect
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import IncompatibleError
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.units import format_size, parse_dtype


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
    ckpt = as_checkpoint(src)
    layout = detect(ckpt)
    if layout is None:
        raise IncompatibleError(f"{ckpt.path}: not quantized (no quantization_config and no quantized tensors)")
    view = FloatView(ckpt, layout)  # refuses formats it cannot read, before anything is written
    assert layout.scheme is not None  # FloatView refused a layout without one
    target = parse_dtype(dtype)
    report = Report("dequantize", output=str(out))
    params = {"dtype": str(target) if target else None, "scheme": layout.scheme.to_dict()}
    with report.timed("total"):
        writer = CheckpointWriter(
            out,
            steps=[provenance_step("dequantize", params, [ckpt])],
            config=view.config,
            carry=ckpt.carry_files,
            dtype=target,
            shard_size=shard_size,
            force=force,
        )
        with writer:
            for name in progress(view, total=len(view), desc="dequantize"):
                writer.write(name, view[name])
    report.summary.update(
        source=str(ckpt.path),
        scheme=layout.scheme.label,
        method=layout.method,
        dequantized_tensors=len(layout.modules),
        bytes_in=ckpt.nbytes,
        bytes_out=writer.total_size,
        size_in=format_size(ckpt.nbytes),
        size_out=format_size(writer.total_size),
        shards=writer.num_shards,
    )
    return report
