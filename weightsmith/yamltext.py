"""YAML for configs and recipes: parsed safely, and refused with one line when it is not the mapping expected."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from weightsmith.errors import ConfigError


def parse_mapping(text: str, where: str, expected: str) -> dict:
    """The mapping a YAML document holds; ``where`` names the file in errors, ``expected`` says what it should hold."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with {expected}")
    return raw


def load_mapping(source: Mapping | str | os.PathLike, what: str, expected: str) -> tuple[dict, str]:
    """A ``what`` (e.g. "recipe") given as a dict or a YAML file: its mapping, and the name its errors use."""
    if isinstance(source, Mapping):
        return dict(source), what
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    return parse_mapping(path.read_text(), str(path), expected), str(path)
