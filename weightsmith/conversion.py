"""Copy-through: reshard, recast or turn ``.bin`` into safetensors, one tensor at a time."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, TensorSource
from weightsmith.report import Report
from weightsmith.stream import Item, Stored, Written, stream
from weightsmith.units import format_size, parse_dtype

# output name -> a function producing its tensor (called once, at write time), or None: the source's tensor of that
# name unchanged (its bytes copied without decoding where the writer can)
TensorPlan = Mapping[str, Callable[[], torch.Tensor] | None]


def as_checkpoint(source: TensorSource | str | os.PathLike) -> TensorSource:
    return source if isinstance(source, TensorSource) else Checkpoint(source)


def convert(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Write ``src`` again as safetensors, optionally cast (float tensors only) and resharded.

    Peak memory: one tensor plus the write buffer, never the model.

    >>> ws.convert("gpt2-bin/", "gpt2-st/", dtype="bf16", shard_size="500MB")  # doctest: +SKIP
    """
    return copy_through(as_checkpoint(src), out, operation="convert", dtype=dtype, shard_size=shard_size, force=force)


def copy_through(
    ckpt: TensorSource,
    out: str | os.PathLike,
    *,
    operation: str,
    plan: TensorPlan | None = None,
    params: Mapping | None = None,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Stream ``plan`` (default: every tensor of ``ckpt`` as it is) into ``out``; config and carried files follow."""
    plan = plan if plan is not None else dict.fromkeys(ckpt)
    target = parse_dtype(dtype)

    def produce(name: str) -> list[Item]:
        make = plan[name]
        return [(name, Stored(ckpt, name) if make is None else make())]

    def summary(written: Written) -> dict:
        return {
            "source": str(ckpt.path),
            "tensors": len(plan),
            "bytes_in": format_size(ckpt.nbytes),
            "bytes_out": format_size(written.bytes),
            "shards": written.shards,
        }

    return stream(
        ckpt,
        out,
        operation=operation,
        params={"dtype": str(target) if target else None, "shard_size": shard_size, **(params or {})},
        transform=produce,
        names=plan,
        summary=summary,
        dtype=target,
        shard_size=shard_size,
        force=force,
    )
