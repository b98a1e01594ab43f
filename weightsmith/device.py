"""The compute device a verb's heavy math runs on: ``cpu`` (default), ``cuda`` or ``cuda:N``.

Tensors are read and written on the CPU; a verb that takes ``device`` moves each piece of math there and the
result back. Imports torch only when a CUDA device is asked for.
"""

from __future__ import annotations

import re

from weightsmith.errors import ConfigError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(device: str | None) -> str:
    """``device`` checked and normalised (``"cuda"`` → ``"cuda:0"``); refused with one line when it is not a device
    name or this machine has no such device."""
    text = "cpu" if device is None else str(device).strip().lower()
    m = _DEVICE.match(text)
    if m is None or (m[1] == "cpu" and m[2] not in (None, "0")):
        raise ConfigError(f"`device` {device!r}: expected cpu, cuda or cuda:N")
    if m[1] == "cpu":
        return "cpu"
    import torch

    index = int(m[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
        raise ConfigError(f"`device` {device!r}: not available (this machine has {have})")
    return f"cuda:{index}"
