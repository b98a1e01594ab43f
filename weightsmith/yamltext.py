"""YAML for configs and recipes: parsed safely, and refused with one line when it is not the mapping expected.

Anchors and aliases are allowed, but a document whose aliases expand to more than ``MAX_NODES`` nodes (the "billion
laughs" shape: each level repeats the previous one ten times) or refer to themselves is refused before anything is
built from it: every later step that walks the config (validation, the provenance record) would walk the expansion.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from weightsmith.errors import ConfigError

MAX_NODES = 100_000  # a merge config of 1,000 models with 20 parameters each is about 60,000 nodes


def parse_mapping(text: str, where: str, expected: str) -> dict:
    """The mapping a YAML document holds; ``where`` names the file in errors, ``expected`` says what it should hold."""
    documents = parse_documents(text, where)
    if len(documents) > 1:
        raise ConfigError(f"{where}: expected a single YAML document with {expected}, found {len(documents)}")
    raw = documents[0] if documents else None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with {expected}")
    return raw


def parse_documents(text: str, where: str) -> list:
    """Every document of a YAML stream (``---`` separated), each checked for alias expansion before it is built;
    empty documents are left out."""
    import yaml

    # libyaml's parser where PyYAML was built with it (the wheels are): the same documents, nodes and errors as the
    # pure-Python one, tens of times faster on large or hostile input
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    documents = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_expansion(node, where)
            document = loader.construct_document(node)
            if document is not None:
                documents.append(document)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()
    return documents


def _check_expansion(root, where: str) -> None:
    """Refuse a node graph that expands (aliases followed) to more than MAX_NODES nodes, or into itself."""
    import yaml

    def children(node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    sizes: dict[int, int] = {}
    entered: set[int] = set()  # nodes whose subtree is being counted: meeting one again is a cycle
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            entered.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[key] > MAX_NODES:
                raise ConfigError(f"{where}: its anchors and aliases expand to more than {MAX_NODES:,} values; refused")
            continue
        if key in sizes:
            continue
        if key in entered:
            raise ConfigError(f"{where}: an alias refers to the value that contains it (a recursive YAML document)")
        entered.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)


def load_mapping(source: Mapping | str | os.PathLike, what: str, expected: str) -> tuple[dict, str]:
    """A ``what`` (e.g. "recipe") given as a dict or a YAML file: its mapping, and the name its errors use."""
    if isinstance(source, Mapping):
        return dict(source), what
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    return parse_mapping(read_text(path), str(path), expected), str(path)


def read_text(path: Path) -> str:
    """A text file as UTF-8, refused with one line when it cannot be read or is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
