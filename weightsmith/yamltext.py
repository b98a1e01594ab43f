"""YAML for configs and recipes: parsed safely, and refused with one line when it is not the mapping expected."""

from __future__ import annotations

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
