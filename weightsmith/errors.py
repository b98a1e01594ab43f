"""The errors weightsmith raises. The CLI prints the message as one line and exits 2 for bad input, 3 when the machine
refused a write (StorageError)."""

from __future__ import annotations


class WeightsmithError(Exception):
    """Bad input or a refused operation: one line naming the file, the tensor and the problem.

    A message names the parameters it is about in backticks (`sparsity`), as a library caller spells them; the CLI
    writes each one that is an option of the command as its flag (--sparsity)."""


class CheckpointError(WeightsmithError):
    """A checkpoint that cannot be read: missing, truncated, malformed or unsafe."""


class ConfigError(WeightsmithError):
    """Parameters or a config (YAML, CLI flags) that do not make sense."""


class IncompatibleError(WeightsmithError):
    """Inputs that do not fit together: names, shapes, vocabularies, adapter targets."""


class DestinationError(WeightsmithError):
    """An output path that exists (without force) or cannot be written."""


class StorageError(DestinationError):
    """The machine refused a write: disk full, quota exhausted, read-only or forbidden folder, file-size limit.
    Neither bad input nor a bug: the CLI exits 3 (``EXIT_STORAGE``)."""


EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3


class NumericalError(WeightsmithError):
    """NaN or Inf in an input or a result."""
