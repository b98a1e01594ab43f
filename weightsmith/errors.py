"""The errors weightsmith raises for bad input. The CLI prints the message as one line and exits 2."""

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


class NumericalError(WeightsmithError):
    """NaN or Inf in an input or a result."""
