"""``stream``: the one writing loop every streaming verb ends in.

A verb opens a view (a lazy tensor mapping that knows its location, config, carried files and history), says what
each of its names becomes, and hands both to ``stream``, which owns the rest: the atomic ``CheckpointWriter``, the
progress bar, the timing and the report.

    view  →  transform(name) → [(out_name, tensor | Stored | Rows), …]  →  shards, config.json, carried files

The default transform copies each tensor of the view as it is: its bytes go file to file where the view says where
they lie (``location``), else the tensor is read and written. A transform that computes a tensor a block of rows at
a time returns ``Rows``, which the writer fills piece by piece into buffers of its own. Only torch is imported.

>>> import tempfile, torch, weightsmith as ws
>>> from weightsmith.stream import stream
>>> d = tempfile.mkdtemp()
>>> _ = ws.save({"w": torch.arange(4.0)}, f"{d}/src")
>>> report = stream(ws.open(f"{d}/src"), f"{d}/out", operation="copy", params={})
>>> ws.open(f"{d}/out")["w"].tolist()
[0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from weightsmith.checkpoint.files import DEFAULT_SHARD_SIZE, SAFETENSORS_INDEX
from weightsmith.checkpoint.reader import TensorSource
from weightsmith.checkpoint.writer import CheckpointWriter, Rows, provenance_step
from weightsmith.progress import progress
from weightsmith.report import Report


@dataclass(frozen=True)
class Stored:
    """An output tensor that is ``source``'s tensor ``name`` as stored: copied without decoding where it can be."""

    source: TensorSource
    name: str


Item = tuple[str, torch.Tensor | Stored | Rows]  # (output name, its tensor, where it is stored, or how its rows come)
Transform = Callable[[str], Iterable[Item]]  # one input name → zero or more output tensors, in writing order


@dataclass(frozen=True)
class Written:
    """What a stream wrote: output tensors, their bytes and the number of shard files."""

    tensors: int
    bytes: int
    shards: int


def copy(view: TensorSource) -> Transform:
    """The default transform: each name of ``view`` written under its own name, unchanged."""
    return lambda name: [(name, Stored(view, name))]


@contextmanager
def compute_threads(workers: int = 1) -> Iterator[int]:
    """torch's intra-op threads while a verb computes beside the writer: the usable cores less one (left to the
    writer's I/O and hashing threads), shared by ``workers``, at least 1 and never more than were set before;
    restored afterwards. Folds and merges work in megabyte-sized blocks, and each operation wakes torch's thread
    pool: with every core already busy, the wake-ups and barriers cost more than the parallel arithmetic gives."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    previous = torch.get_num_threads()
    threads = max(1, min(previous, (cores - 1) // workers))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def stream(
    view: TensorSource,
    out: str | os.PathLike,
    *,
    operation: str,
    params: Mapping[str, Any],
    transform: Transform | None = None,
    names: Iterable[str] | None = None,
    inputs: Sequence[TensorSource | str | Path] | None = None,
    config: dict | None | Literal["view"] = "view",
    carry: Sequence[Path] | None = None,
    files: Callable[[], Mapping[str, str | bytes]] | None = None,
    summary: Callable[[Written], Mapping[str, Any]] | None = None,
    report: Report | None = None,
    desc: str | None = None,
    dtype: torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    prefix: str = "model",
    index_name: str | None = SAFETENSORS_INDEX,
    timing: str = "total",
) -> Report:
    """Write ``transform(name)`` for every name of ``names`` (default: the view's) into ``out``, atomically.

    Provenance: one step ``operation``/``params`` over ``inputs`` (default: the view, whose own history the writer
    puts first). ``config`` (``"view"``: the view's), ``carry`` (default the view's carried files) and the extra
    ``files`` (called after the last tensor, so that it may use what the transform gathered; it may also raise,
    and then nothing is written) complete the directory. ``summary`` turns the ``Written`` figures into the
    report's headline; the report (``report`` or a new one) gets the time under ``timing`` (default ``total``).
    ``dtype`` casts float tensors at write time; ``prefix``/``index_name``/``shard_size`` name and split the shards.
    """
    transform = transform or copy(view)
    names = list(view) if names is None else list(names)
    report = report or Report(operation, output=str(out))
    steps = [provenance_step(operation, params, [view] if inputs is None else inputs)]
    with report.timed(timing):
        writer = CheckpointWriter(
            out,
            steps=steps,
            config=view.config if isinstance(config, str) else config,
            carry=view.carry_files if carry is None else carry,
            dtype=dtype,
            shard_size=shard_size,
            force=force,
            prefix=prefix,
            index_name=index_name,
        )
        count = 0
        with writer:
            for name in progress(names, total=len(names), desc=desc or operation):
                for out_name, value in transform(name):
                    if isinstance(value, Stored):
                        writer.write_from(value.source, value.name, as_name=out_name)
                    elif isinstance(value, Rows):
                        writer.write_rows(out_name, value)
                    else:
                        writer.write(out_name, value)
                    count += 1
            for rel, content in (files() if files is not None else {}).items():
                writer.add_file(rel, content)
    if summary is not None:
        report.summary.update(summary(Written(count, writer.total_size, writer.num_shards)))
    return report


__all__ = ["Item", "Rows", "Stored", "Transform", "Written", "compute_threads", "copy", "stream"]
