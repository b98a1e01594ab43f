"""QLoRA adapters and quantized bases (bitsandbytes NF4, compressed-tensors int8).

An adapter trained on a quantized base learned ΔW on top of Ŵ = deq(Q(W)), not W. Three ways to fold it:

- into the original float base, W + ΔW (plain ``lora merge`` on the float checkpoint): the best weights when the
  user has them, but they differ from the model the adapter was trained with by the base's quantization error W − Ŵ;
- into the quantized base, written in float: Ŵ + ΔW exactly the trained model (``lora merge QBASE``, the default
  for a quantized base), at float size;
- into the quantized base, re-quantized: Q(Ŵ + ΔW) (``requantize=True``), at quantized size, with a new rounding
  error that may swallow part of ΔW (PEFT's merge on a 4-bit layer does this and warns).

``routes`` measures each route per module against Ŵ + ΔW, relative to ‖ΔW‖ (how much of the adapter's change the
route loses), so the choice can be made on numbers. Only torch is imported (bitsandbytes for NF4's codec).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from weightsmith.checkpoint import TensorSource
from weightsmith.errors import IncompatibleError
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.stream import Item, Stored, compute_threads, stream
from weightsmith.units import format_size


def dequantized(ckpt: TensorSource) -> TensorSource:
    """``ckpt`` itself when it is float, else its ``DequantizedView`` (``compress.quantize.dequantize``)."""
    from weightsmith.compress.quantize.dequantize import dequantized as _dequantized

    return _dequantized(ckpt)


def merge_requantized(folded, out, params: dict, *, shard_size, force: bool) -> Report:
    """Stream a fold into a quantized base back out in the base's own scheme, reporting per re-quantized module
    the rounding error relative to ‖ΔW‖: ‖deq(Q(Ŵ + ΔW)) − (Ŵ + ΔW)‖_F / ‖ΔW‖_F."""
    from weightsmith.compress.quantize import open_quantized
    from weightsmith.compress.quantize.chunks import distance
    from weightsmith.compress.quantize.dequantize import DequantizedView

    base = folded.base
    if not isinstance(base, DequantizedView):
        raise IncompatibleError(f"{base.path}: requantize needs a quantized base (NF4 or int8); this one is float")
    layout = base.layout
    view = open_quantized(folded, base.scheme, ignore=layout.ignore)
    targets = set(view.targets)
    rows: list[dict] = []

    def requantize(name: str) -> Sequence[Item]:
        if name not in targets:
            return [(name, Stored(view, name))]
        merged = folded[name]  # in the base's recorded dtype, as the format stores it
        parts = view.quantized(name, merged)
        if folded._changed(name):  # norms taken a slice at a time: no float copy of a whole weight
            rows.append(_row(name, distance(merged, base[name]), distance(view.codec.dequantize_module(parts), merged)))
        return view.stored_items(name, parts)

    with compute_threads():  # the fold's blocks and the codecs' slices, beside the writer's threads, as in _stream
        report = stream(
            view,
            out,
            operation="quantize",
            params=view.params,
            inputs=[folded],
            names=folded,
            transform=requantize,
            report=Report("lora merge", output=str(out)),
            desc="lora merge (requantize)",
            shard_size=shard_size,
            force=force,
            summary=lambda written: {
                **_loss_summary(rows, "requantize_loss"),
                "base": str(base.path),
                "scheme": base.scheme.label,
                "adapters": [f"{a.path}@{w:g}" for a, w in folded.adapters],
                "tensors": len(view),
                "bytes_out": format_size(written.bytes),
                "shards": written.shards,
            },
        )
    report.tensors = sorted(rows, key=lambda r: -r["loss"])
    report.notes.append(
        "re-quantized: each rounding error is relative to the adapter's own change ‖ΔW‖ (1.0 would erase it)"
    )
    return report


def _row(name: str, d: float, err: float) -> dict:
    """A re-quantized weight's figures: ‖ΔW‖, the rounding error ‖deq(Q(Ŵ + ΔW)) − (Ŵ + ΔW)‖ and their ratio."""
    return {"name": name, "delta_norm": round(d, 6), "error_norm": round(err, 6), "loss": err / d if d else 0.0}


def _loss_summary(rows: list[dict], key: str) -> dict:
    """Mean and max of the rows' losses (nothing when no row)."""
    if not rows:
        return {}
    return {
        f"{key}_mean": round(sum(r["loss"] for r in rows) / len(rows), 6),
        f"{key}_max": round(max(r["loss"] for r in rows), 6),
    }


def routes(
    quantized_base: TensorSource | str | os.PathLike,
    adapters: Sequence,
    *,
    float_base: TensorSource | str | os.PathLike | None = None,
    dtype: str | None = None,
) -> Report:
    """Measure the three routes for folding a QLoRA adapter (module docstring) without writing anything.

    Per adapted weight, against the model the adapter was trained with, T = Ŵ + ΔW, each as ‖route − T‖_F / ‖ΔW‖_F:
    ``float_base`` (W + ΔW; needs ``float_base``), ``dequantized`` (T written in ``dtype``, default the format's
    recorded dtype: 0 in float32), ``requantized`` (deq(Q(T))). Summary: mean and max of each.

    >>> ws.lora.routes("llama-nf4", ["qlora-adapter"], float_base="llama").summary  # doctest: +SKIP
    """
    from weightsmith.compress.quantize import open_quantized
    from weightsmith.compress.quantize.chunks import distance
    from weightsmith.compress.quantize.dequantize import DequantizedView
    from weightsmith.conversion import as_checkpoint
    from weightsmith.merge.lora.fold import open_folded
    from weightsmith.units import parse_dtype

    qbase = as_checkpoint(quantized_base)
    folded = open_folded(qbase, adapters, dtype=torch.float32)
    base = folded.base
    if not isinstance(base, DequantizedView):
        raise IncompatibleError(f"{qbase.path}: not quantized; routes compares folds into a quantized base")
    fbase = as_checkpoint(float_base) if float_base is not None else None
    requant = open_quantized(folded, base.scheme, ignore=base.layout.ignore)
    target_dtype = parse_dtype(dtype)
    rows = []
    report = Report("lora routes", output=None)
    with report.timed("total"):
        for name in progress(list(folded.changed), desc="lora routes"):
            if not base.is_quantized(name):
                continue
            trained = folded[name]  # Ŵ + ΔW, in float32
            d = distance(trained, base[name]) or 1.0
            row: dict = {"name": name, "delta_norm": round(d, 6)}
            stored = target_dtype or base.info(name).dtype
            row["dequantized"] = round(distance(trained.to(stored), trained) / d, 6)
            parts = requant.quantized(name, trained)
            row["requantized"] = round(distance(requant.codec.dequantize_module(parts), trained) / d, 6)
            if fbase is not None:
                if name not in fbase or tuple(fbase.info(name).shape) != tuple(trained.shape):
                    raise IncompatibleError(f"{fbase.path}: tensor {name!r} missing or of another shape")
                row["float_base"] = round(distance(fbase[name], base[name]) / d, 6)  # (W + ΔW) − (Ŵ + ΔW)
            rows.append(row)
    if not rows:
        raise IncompatibleError(f"{qbase.path}: the adapters change no quantized weight")
    for key in ("float_base", "dequantized", "requantized"):
        values = [r[key] for r in rows if key in r]
        if values:
            report.summary[f"{key}_mean"] = round(sum(values) / len(values), 6)
            report.summary[f"{key}_max"] = round(max(values), 6)
    report.summary.update(base=str(qbase.path), scheme=base.scheme.label, modules=len(rows))
    report.notes.append("each figure is ‖route − (Ŵ + ΔW)‖ / ‖ΔW‖ per weight, Ŵ the dequantized base")
    report.tensors = rows
    return report


__all__ = ["dequantized", "merge_requantized", "routes"]
