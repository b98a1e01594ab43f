"""``CheckpointView``: a lazy transform of a ``TensorSource``, composed over its ``source``.

A view reads its source only through the ``TensorSource`` interface (names, ``info``, ``location``,
``check_unchanged``, ``digest``, ``config``, the files' facts, ``history``) and holds none of a file reader's state:
no weight files, no index, no name table of files. It is a ``TensorSource`` itself, so views chain and every verb,
the writer and ``stream`` take one wherever they take a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from weightsmith.checkpoint.files import TensorInfo
from weightsmith.checkpoint.source import TensorSource


class CheckpointView(TensorSource):
    """A lazy transform of a checkpoint with the same reader interface: tensors are computed when read.

    This is how streamed steps chain without intermediate files: the writer records the view's steps in the
    output's provenance. A subclass overrides ``__getitem__`` and
    ``_changed`` (the tensors it computes); ``dtype`` casts float tensors; where names or shapes change it also
    overrides ``_source_name``, ``_order``, ``info`` and ``config``. Files, carried files and digests are the source's,
    read through ``source``.
    """

    dtype: torch.dtype | None = None  # float tensors come out in this dtype (None: each source tensor's own)

    def __init__(self, source: TensorSource, step: dict):
        self.source = source
        self.path, self.root = source.path, source.root
        self.config, self.adapter_config = source.config, source.adapter_config
        self._order = list(source)
        self.history = [*source.history, step]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._order

    def _source_name(self, name: str) -> str:
        """The source tensor ``name`` starts from."""
        return name

    def _changed(self, name: str) -> bool:
        """True for tensors the view computes (they have no bytes on disk)."""
        return True

    def info(self, name: str) -> TensorInfo:
        src = self.source.info(self._source_name(name))
        dtype = self.dtype if self.dtype is not None and src.dtype.is_floating_point else src.dtype
        return TensorInfo(name, src.shape, dtype, src.file)

    def location(self, name: str) -> tuple[Path, int, int] | None:
        """An untouched, uncast tensor's bytes in the source (the writer copies them file to file); else None."""
        source_name = self._source_name(name)
        if self._changed(name) or self.info(name).dtype != self.source.info(source_name).dtype:
            return None
        return self.source.location(source_name)

    def check_unchanged(self, name: str, fd: int) -> None:
        self.source.check_unchanged(self._source_name(name), fd)

    # -- the source's files, read through it ----------------------------------------------------------------------

    @property
    def format(self) -> str:
        return self.source.format

    @property
    def weight_files(self) -> list[Path]:
        return self.source.weight_files

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata

    @property
    def carry_files(self) -> list[Path]:
        return self.source.carry_files

    def digest(self) -> str:
        return self.source.digest()
