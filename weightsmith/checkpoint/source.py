"""``TensorSource``: what every reader of checkpoint data is — a read-only, lazy tensor mapping that knows its
location, config, carried files and history.

Two kinds implement it: ``Checkpoint`` (files on disk) and ``CheckpointView`` (a lazy transform of another source).
Verbs, the writer and the ``stream`` loop accept any ``TensorSource``, so views chain without intermediate files.
A subclass provides the tensors (``__getitem__``, ``__iter__``, ``info``, ``location``, ``check_unchanged``) and the
facts of its files (``format``, ``weight_files``, ``metadata``, ``carry_files``, ``digest``); the rest is derived.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from weightsmith.architecture import tied_heads
from weightsmith.checkpoint.files import TensorInfo


class TensorSource(Mapping[str, torch.Tensor], ABC):
    """A lazy tensor dict with provenance: ``src[name]`` reads (or computes) one tensor; ``src.info(name)`` gives its
    shape and dtype without reading; iteration follows storage order."""

    path: Path  # what it was opened from (a directory or a file)
    root: Path  # the directory holding its files
    config: dict | None  # config.json (None for a bare weight file or an adapter)
    adapter_config: dict | None  # adapter_config.json of a PEFT adapter, else None
    history: list[dict]  # the provenance steps that made these tensors

    @abstractmethod
    def __getitem__(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Name, shape, dtype and file of tensor ``name``, without reading it."""

    @abstractmethod
    def location(self, name: str) -> tuple[Path, int, int] | None:
        """Where a tensor's bytes lie on disk as stored (file, offset, count), or None when they must be computed."""

    @abstractmethod
    def check_unchanged(self, name: str, fd: int) -> None:
        """Refuse when the file holding ``name`` (open as ``fd``) changed since it was opened."""

    @abstractmethod
    def digest(self) -> str:
        """sha256 of the weights this source reads."""

    @property
    @abstractmethod
    def format(self) -> str:
        """The weight files' format: ``safetensors``, ``pytorch`` or ``gguf``."""

    @property
    @abstractmethod
    def weight_files(self) -> list[Path]: ...

    @property
    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the first weight file (provenance lives here)."""

    @property
    @abstractmethod
    def carry_files(self) -> list[Path]:
        """Non-weight files an output copies (tokenizer, generation config, sub-folders such as 1_Pooling)."""

    def infos(self) -> list[TensorInfo]:
        return [self.info(n) for n in self]

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos())

    @property
    def tied_weights(self) -> dict[str, str]:
        """Output-embedding names that are not stored because they share the input embedding: {missing: stored}."""
        return tied_heads(self.config, list(self))


__all__ = ["TensorSource"]
