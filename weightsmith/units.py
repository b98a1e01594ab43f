"""Parsing of human sizes and dtype names shared by the CLI and the library."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from weightsmith.errors import ConfigError

if TYPE_CHECKING:
    import torch

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

# Names accepted by --dtype, mapped to torch dtype attribute names.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}


def parse_weighted(text: str) -> tuple[str, float]:
    """``PATH[@WEIGHT]``: a trailing ``@number`` is the weight (default 1); any other ``@`` is part of the path.

    >>> parse_weighted("adapters/math@0.7"), parse_weighted("user@host/model")
    (('adapters/math', 0.7), ('user@host/model', 1.0))
    """
    path, sep, weight = text.rpartition("@")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain integer (decimal units are powers of 10, as on the Hub).

    >>> parse_size("2GiB"), parse_size("500MB"), parse_size(1024)
    (2147483648, 500000000, 1024)
    """
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ConfigError(f"size {text!r}: expected a number with an optional unit such as 500MB, 5GB or 2GiB")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"size {text!r}: must be positive")
    return size


def format_size(n: int | float) -> str:
    """``1.5 GB`` style (decimal units, as ``parse_size`` reads them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch float dtype from ``bf16``/``bfloat16``/``torch.bfloat16``…; None passes through."""
    if name is None:
        return None
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r}: expected one of float32, float16, bfloat16, float64")
    return getattr(torch, DTYPE_NAMES[key])
