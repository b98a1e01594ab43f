"""``Checkpoint``: the ``TensorSource`` over files — a model directory, a weight file or a PEFT adapter (its lazy
transforms, ``CheckpointView``, live in ``checkpoint.view``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from weightsmith.checkpoint.files import (
    ADAPTER_CONFIG,
    MANIFEST,
    SAFETENSORS_INDEX,
    TORCH_INDEX,
    WEIGHT_SUFFIXES,
    SafetensorsFile,
    TensorInfo,
    open_weight_file,
    parse_json_object,
)
from weightsmith.checkpoint.gguf_file import GGUFFile
from weightsmith.checkpoint.source import TensorSource
from weightsmith.digests import file_sha256
from weightsmith.errors import CheckpointError


def _read_json(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_json_object(raw, f"{path}: not valid JSON")


# config.json fields weightsmith computes with, and the JSON types they must have when present (transformers' own
# loader would refuse the same values, later and with a traceback)
_CONFIG_STR = ("model_type", "torch_dtype", "dtype", "hidden_act")
_CONFIG_POSITIVE_INT = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "d_model",
    "num_layers",
    "num_heads",
)


def _check_config(path: Path, config: dict) -> dict:
    """Refuse a config.json whose well-known fields have the wrong JSON type (one line naming the field)."""

    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key} must be {expected}, not {str(config[key])[:40]!r}")

    for key in _CONFIG_STR:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise bad(key, "a string")
    for key in _CONFIG_POSITIVE_INT:
        if config.get(key) is not None and not (type(config[key]) is int and config[key] > 0):
            raise bad(key, "a positive integer")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise bad("architectures", "a list of class names")
    if config.get("tie_word_embeddings") is not None and not isinstance(config["tie_word_embeddings"], bool):
        raise bad("tie_word_embeddings", "true or false")
    for key in ("quantization_config", "rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise bad(key, "an object")
    return config


def _shards_from_index(
    root: Path, index_path: Path, only: Collection[str] | None = None
) -> list[tuple[Path, set[str]]]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    by_file: dict[str, set[str]] = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not rel or "\0" in rel:
            raise CheckpointError(f"{index_path}: tensor {name!r} maps to {str(rel)[:60]!r}, not a file name")
        by_file.setdefault(rel, set()).add(name)
    shards = []
    for rel, names in by_file.items():
        target = (root / rel).resolve()
        if Path(rel).is_absolute() or not target.is_relative_to(root.resolve()):
            raise CheckpointError(f"{index_path}: shard {rel!r} lies outside the checkpoint directory")
        if not target.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            raise CheckpointError(f"{index_path}: shard {rel!r} is not a .safetensors or .bin file")
        if only is not None and rel not in only:
            continue
        if not target.is_file():
            raise CheckpointError(f"{index_path}: names shard {rel!r}, which is missing")
        shards.append((root / rel, names))
    return shards


class Checkpoint(TensorSource):
    """A read-only, lazy tensor dict over a model directory, a weight file or a PEFT adapter directory.

    ``ckpt[name]`` reads that tensor (a fresh, writable tensor each time); ``ckpt.info(name)`` gives its shape and
    dtype without reading. Iteration follows storage order so that a full pass reads each file sequentially.

    >>> ckpt = weightsmith.open("path/to/model")            # doctest: +SKIP
    >>> ckpt.info("model.embed_tokens.weight").shape         # doctest: +SKIP
    (32000, 4096)
    """

    def __init__(self, path: str | os.PathLike, *, shards: Collection[str] | None = None):
        """``shards``: of a sharded directory, open only these files of its index (a partial download); the
        tensors of the other shards are then absent."""
        self.path = Path(path)
        self._only = shards
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.config: dict | None = None
        self.adapter_config: dict | None = None
        self.index_file: Path | None = None
        files = self._locate_files()
        self._files = [open_weight_file(p, str(p.relative_to(self.root))) for p in files]
        if self.config is None and isinstance(self._files[0], GGUFFile):
            self.config = self._files[0].config  # a GGUF file carries its architecture in its metadata
        self._where: dict[str, Any] = {}
        for wf in self._files:
            for name in wf.names():
                if name in self._where:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears in both {self._where[name].label} and {wf.label}"
                    )
                self._where[name] = wf
        if self.index_file is not None:
            self._check_index_agrees()
        self._order = list(self._where)
        self.history: list[dict] = _recorded_steps(self.metadata)  # the steps that made these tensors

    # -- layout ---------------------------------------------------------------------------------------------------

    def _locate_files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if (p / ADAPTER_CONFIG).is_file():
            self.adapter_config = _read_json(p / ADAPTER_CONFIG)
            for name in ("adapter_model.safetensors", "adapter_model.bin"):
                if (p / name).is_file():
                    return [p / name]
            raise CheckpointError(f"{p}: adapter directory without adapter_model.safetensors or adapter_model.bin")
        if (p / "config.json").is_file():
            self.config = _check_config(p / "config.json", _read_json(p / "config.json"))
        for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
            if (p / index_name).is_file():
                self.index_file = p / index_name
                self._index_shards = _shards_from_index(p, self.index_file, self._only)
                return [shard for shard, _ in self._index_shards]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return [p / name]
        found = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if found:
            return found
        if not any(p.iterdir()):
            raise CheckpointError(f"{p}: empty directory")
        raise CheckpointError(
            f"{p}: no weights found (expected model.safetensors, a sharded index, "
            f"pytorch_model.bin or adapter_model.safetensors)"
        )

    def _check_index_agrees(self) -> None:
        for shard, names in self._index_shards:
            label = str(shard.relative_to(self.root))
            stored = {n for n, wf in self._where.items() if wf.label == label}
            if names - stored:
                missing = sorted(names - stored)
                raise CheckpointError(
                    f"{self.index_file}: {len(missing)} tensor(s) listed for {label} are not in it, e.g. {missing[0]!r}"
                )
            if stored - names:
                extra = sorted(stored - names)
                raise CheckpointError(
                    f"{shard}: holds {len(extra)} tensor(s) the index does not list, e.g. {extra[0]!r}"
                )

    # -- Mapping --------------------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    # -- facts without reading data -------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        return self._where[name].entries[name][0]

    def location(self, name: str) -> tuple[Path, int, int] | None:
        """Where a tensor's bytes lie on disk (file, offset, count), or None when they are not stored raw (.bin)."""
        wf = self._where[name]
        return wf.location(name) if isinstance(wf, SafetensorsFile) else None

    def check_unchanged(self, name: str, fd: int) -> None:
        """Refuse when the file holding ``name`` (open as ``fd``) changed since this checkpoint was opened."""
        wf = self._where[name]
        if isinstance(wf, SafetensorsFile):
            wf.check_unchanged(fd, name)

    @property
    def format(self) -> str:
        if isinstance(self._files[0], SafetensorsFile):
            return "safetensors"
        return "gguf" if self._files[0].path.suffix == ".gguf" else "pytorch"

    @property
    def weight_files(self) -> list[Path]:
        return [wf.path for wf in self._files]

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the first weight file (provenance lives here)."""
        return dict(self._files[0].metadata)

    @property
    def carry_files(self) -> list[Path]:
        """Non-weight files to copy into an output (tokenizer, generation config, sub-folders such as 1_Pooling).

        config.json and adapter_config.json are excluded: the writer writes the (possibly rewritten) config itself;
        so is the manifest, which describes the files of this checkpoint only. A GGUF file's vocabulary is rebuilt as
        tokenizer files (see ``GGUFFile.tokenizer_files``).
        """
        if not self.path.is_dir():
            wf = self._files[0]
            return wf.tokenizer_files() if isinstance(wf, GGUFFile) else []
        out = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(".") or entry.name in ("config.json", ADAPTER_CONFIG, MANIFEST):
                continue
            if entry.is_file() and not entry.name.endswith(WEIGHT_SUFFIXES):
                out.append(entry)
            elif entry.is_dir() and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in entry.rglob("*")):
                out.append(entry)
        return out

    def digest(self) -> str:
        """sha256 of the weights: of the file itself for a single file, else of the per-file digests."""
        digests = [(str(p.relative_to(self.root)), file_sha256(p)) for p in self.weight_files]
        if len(digests) == 1:
            return digests[0][1]
        return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in digests).encode()).hexdigest()


def _recorded_steps(metadata: Mapping[str, str]) -> list[dict]:
    """The provenance steps a weightsmith output recorded ([] for other files or unreadable metadata)."""
    try:
        record = json.loads(metadata.get("weightsmith", "{}"))
    except (ValueError, RecursionError):
        return []
    steps = record.get("steps") if isinstance(record, dict) else None
    if not isinstance(steps, list):
        return []
    return [
        s
        for s in steps
        if isinstance(s, dict)
        and isinstance(s.get("operation", ""), str)
        and isinstance(s.get("inputs", []), list)
        and all(isinstance(i, dict) for i in s.get("inputs", []))
    ]


def open(path: str | os.PathLike) -> Checkpoint:  # noqa: A001 - the public verb, as in safetensors.safe_open
    """Open a checkpoint lazily: a model directory, a ``.safetensors``/``.bin``/``.gguf`` file, or a PEFT adapter
    directory. A GGUF file reads as the transformers checkpoint it stands for (names, config, float tensors)."""
    return Checkpoint(path)
