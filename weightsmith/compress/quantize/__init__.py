"""``quantize``: int8, int4 (W4A16) or FP8 (compressed-tensors), or NF4 (bitsandbytes) in one streamed pass;
``dequantize``: back to float;
``open_quantized``: the quantized checkpoint as a lazy view (what ``quantize`` writes), to stream into another step.

    ws.quantize("llama", "llama-int8", scheme="int8")
    ws.quantize("llama", "llama-nf4", scheme=NF4(double_quant=True))
    ws.quantize("llama", "llama-w4a16", scheme=Int4(group_size=128))
    ws.dequantize("llama-nf4", "llama-float")

The scheme is a value: ``REGISTRY`` maps its config type to the codec module that quantizes a module's weight,
describes and checks shapes and writes the format's ``quantization_config``. The verb itself knows no scheme.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, TensorSource
from weightsmith.compress.quantize.chunks import relative_error
from weightsmith.compress.quantize.codecs import REGISTRY
from weightsmith.compress.quantize.dequantize import DequantizedView, dequantize, open_dequantized
from weightsmith.compress.quantize.schemes import FP8, GPTQ, NF4, SCHEMES, Int4, Int8, Scheme, make_scheme
from weightsmith.compress.quantize.targets import DEFAULT_IGNORE
from weightsmith.compress.quantize.view import QuantizedView, open_quantized
from weightsmith.report import Report
from weightsmith.stream import Item, Stored, Written, compute_threads, stream
from weightsmith.units import format_size

__all__ = [
    "DEFAULT_IGNORE",
    "DequantizedView",
    "FP8",
    "GPTQ",
    "NF4",
    "REGISTRY",
    "SCHEMES",
    "Int4",
    "Int8",
    "QuantizedView",
    "dequantize",
    "make_scheme",
    "open_dequantized",
    "open_quantized",
    "quantize",
    "relative_error",
]


def quantize(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    scheme: str | Scheme = "int8",
    *,
    ignore: Sequence[str] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    device: str = "cpu",
    **options: Any,
) -> Report:
    """Quantize the 2-D Linear weights of ``src`` and write a checkpoint that ``from_pretrained`` loads as is.

    ``scheme``: "int8" / ``Int8(group_size=None, weight_only=False)`` (compressed-tensors W8A8 dynamic or W8A16),
    "int4" / ``Int4(group_size=128, asymmetric=False, gptq=None)`` (compressed-tensors W4A16, round-to-nearest, or
    GPTQ with ``gptq=GPTQ(calibration="calib.txt", ...)``: see ``gptq_driver``), "fp8" /
    ``FP8()`` (compressed-tensors e4m3 W8A8, dynamic per-token activations) or "nf4" / ``NF4(group_size=64,
    double_quant=False, compute_dtype="float32")`` (bitsandbytes 4-bit); with a name,
    ``options`` are the config's fields. ``ignore``: module patterns kept float (default: output heads, see
    ``DEFAULT_IGNORE``); embeddings, norms and biases always stay float. Streams one tensor at a time (GPTQ: one
    decoder layer at a time). ``device``: where GPTQ's calibration runs ("cpu", "cuda", "cuda:N").

    The report gives bytes before/after, the compression ratio (whole checkpoint and Linear weights) and the relative
    error ‖W − Q(W)‖/‖W‖ of every quantized weight (mean, max and the worst tensors).

    >>> ws.quantize("llama", "llama-nf4", scheme="nf4", double_quant=True)  # doctest: +SKIP
    """
    view = open_quantized(src, scheme, ignore=ignore, device=device, **options)  # every refusal happens here
    ckpt, selection = view.source, view.selection
    targets = set(selection.targets)
    rows: list[dict[str, Any]] = []

    def quantized(name: str) -> Sequence[Item]:
        if name not in targets:
            return [(name, Stored(view, name))]
        tensor = ckpt[name]
        parts = view.quantized(name, tensor)  # suffix → stored tensor, in the view's order
        rows.append(_row(view, name, tensor, parts))
        return view.stored_items(name, parts)

    # round-to-nearest works on megabyte slices (``chunks``), so torch's threads are capped beside the writer's, as
    # for folds and merges (two cores, NF4 of a 1 GB model: 7.8 → 6.3 s); GPTQ's solves and forward passes keep them
    with contextlib.nullcontext() if view.calibrated else compute_threads():
        report = stream(
            view,
            out,
            operation="quantize",
            params=view.params,
            inputs=[ckpt],
            names=view.source_order,
            transform=quantized,
            desc=f"quantize {view.scheme.name}",
            shard_size=shard_size,
            force=force,
            summary=lambda written: _summary(view, rows, written),
        )
    report.details["ignored_modules"] = selection.kept
    report.details.update(view.details)
    report.tensors = sorted(rows, key=lambda r: -r["rel_error"])  # worst first: the text report shows the top rows
    report.notes += selection.notes
    if view.config is None:
        report.notes.append(
            "no config.json in the input: the output has no quantization_config and "
            "from_pretrained will not load it as a quantized model"
        )
    return report


def _row(view: QuantizedView, name: str, tensor: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One quantized weight's report row: its relative error and its bytes before and after."""
    return {
        "name": name,
        "shape": list(tensor.shape),
        "rel_error": relative_error(tensor, view.codec.dequantize_module(parts)),
        "bytes_in": tensor.numel() * tensor.element_size(),
        "bytes_out": sum(v.numel() * v.element_size() for v in parts.values()),
    }


def _summary(view: QuantizedView, rows: list[dict[str, Any]], written: Written) -> dict[str, Any]:
    """The headline of a quantization: sizes and ratios, mean and worst relative error."""
    ckpt, config = view.source, view.scheme
    errors = [r["rel_error"] for r in rows]
    worst = max(rows, key=lambda r: r["rel_error"])
    return dict(
        source=str(ckpt.path),
        scheme=config.label,
        format=_format_label(config),
        quantized_tensors=len(rows),
        kept_float_modules=len(view.selection.kept),
        bytes_in=ckpt.nbytes,
        bytes_out=written.bytes,
        size_in=format_size(ckpt.nbytes),
        size_out=format_size(written.bytes),
        compression_ratio=round(ckpt.nbytes / written.bytes, 3),
        linear_bytes_ratio=round(sum(r["bytes_out"] for r in rows) / sum(r["bytes_in"] for r in rows), 4),
        rel_error_mean=sum(errors) / len(errors),
        rel_error_max=worst["rel_error"],
        worst_tensor=worst["name"],
        shards=written.shards,
    )


def _format_label(config: Scheme) -> str:
    if isinstance(config, NF4):
        return "bitsandbytes 4-bit (transformers layout)"
    return f"compressed-tensors {REGISTRY[type(config)].format_name(config)}"
