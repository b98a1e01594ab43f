"""A student built from the teacher's own tensors by keeping some of its layers (DistilBERT-style initialisation).

Sanh et al. 2019 (DistilBERT) initialise the student from every other teacher layer; the layer-drop initialisation
matters as much as the distillation itself on small models. Tensors are read from the teacher one at a time and
written with renumbered layer indices; the config's layer count (and any per-layer list) is rewritten to match.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from weightsmith.architecture import LAYER_COUNT_KEYS, declared_layers, split_layer
from weightsmith.checkpoint import TensorSource
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.stream import Stored, stream

_PER_LAYER_LISTS = ("layer_types",)  # config lists with one entry per layer (sliding/full attention, …)
# an encoder-decoder's stack depths (T5: num_decoder_layers; BART, Whisper: encoder_layers, decoder_layers): the
# blocks of both stacks are kept alike
_SECOND_STACK = ("num_decoder_layers", "encoder_layers", "decoder_layers")


def _declared(config: dict | None) -> int | None:
    """The layer count a config declares, or an encoder-decoder's encoder depth where it names no other (BART's and
    Whisper's config.json hold ``encoder_layers``; ``num_hidden_layers`` is only an alias in transformers)."""
    count = declared_layers(config)
    if count is None and config and isinstance(config.get("encoder_layers"), int):
        return config["encoder_layers"]
    return count


def layer_count(config: dict | None, where: str | os.PathLike) -> int:
    """The number of transformer layers a config declares."""
    count = _declared(config)
    if count is None:
        raise CheckpointError(f"{where}: config.json declares no layer count ({' / '.join(LAYER_COUNT_KEYS)})")
    return count


def resolve_layers(
    num_layers: int, layers: Sequence[int] | None, keep_every: int | None, where: str | os.PathLike
) -> list[int]:
    """The teacher layers to keep, checked: in range, strictly increasing, at least one."""
    if layers is not None and keep_every is not None:
        raise ConfigError("give either layers or keep_every, not both")
    if keep_every is not None:
        if keep_every < 1:
            raise ConfigError(f"keep_every {keep_every}: must be at least 1")
        layers = list(range(0, num_layers, keep_every))
    layers = list(layers or [])
    if not layers:
        raise ConfigError("no student layers chosen")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{where}: layer indices {bad} are out of range: the teacher has layers 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"layers {layers}: must be strictly increasing, without repeats")
    return layers


def student_config(config: dict, layers: Sequence[int]) -> dict:
    """The teacher's config with the layer count (and per-layer lists) rewritten for the kept layers."""
    out = dict(config)
    count = _declared(config)
    for key in _SECOND_STACK:
        if isinstance(out.get(key), int):
            if out[key] != count:
                raise ConfigError(
                    f"{key} {out[key]} differs from the encoder's {count} layers: `layers` cannot select both stacks"
                )
            out[key] = len(layers)
    for key in LAYER_COUNT_KEYS:
        if isinstance(out.get(key), int):
            out[key] = len(layers)
    for key in _PER_LAYER_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [out[key][i] for i in layers]
    return out


def student_names(teacher: TensorSource, layers: Sequence[int]) -> dict[str, str]:
    """The student's tensor names → the teacher's: non-layer tensors as they are, kept layers renumbered 0..k-1."""
    new_index = {old: new for new, old in enumerate(layers)}
    names: dict[str, str] = {}
    for name in teacher:
        split = split_layer(name)
        if split is None:
            names[name] = name
        elif split[1] in new_index:
            names[f"{split[0]}.{new_index[split[1]]}.{split[2]}"] = name
    return names


def student_tensors(teacher: TensorSource, layers: Sequence[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the student, read lazily (see ``student_names``)."""
    for name, source in student_names(teacher, layers).items():
        yield name, teacher[source]


def check_first_layer(teacher: TensorSource, layers: Sequence[int]) -> None:
    """Refuse to drop layer 0 when it holds tensors no other layer has (T5's relative attention bias lives in the
    first block only: a student without it would load with that weight missing)."""
    if not layers or layers[0] == 0:
        return
    first: set[tuple[str, str]] = set()
    others: set[tuple[str, str]] = set()
    for name in teacher:
        split = split_layer(name)
        if split is not None:
            (first if split[1] == 0 else others).add((split[0], split[2]))
    only = sorted(f"{pre}.0.{post}" for pre, post in first - others)
    if only:
        raise ConfigError(f"{teacher.path}: layer 0 alone holds {only[0]}; `layers` must keep layer 0")


def write_student(teacher: TensorSource, out: str | os.PathLike, layers: Sequence[int], *, force: bool = False) -> Path:
    """Write the layer-selected student (weights, rewritten config, the teacher's tokenizer files) atomically."""
    check_first_layer(teacher, layers)
    config = student_config(teacher.config or {}, layers)
    names = student_names(teacher, layers)
    stream(
        teacher,
        out,
        operation="distill.init_student",
        params={"layers": list(layers)},
        names=list(names),
        transform=lambda name: [(name, Stored(teacher, names[name]))],  # bytes as stored, renamed
        config=config,
        force=force,
    )
    return Path(out)


def teacher_counterpart(layer: int, kept: Sequence[int] | None, teacher_layers: int, student_layers: int) -> int:
    """The teacher layer whose output student layer ``layer`` should reproduce.

    A student built from kept teacher layers k₀ < k₁ < …: student layer i feeds the copy of teacher layer kᵢ₊₁, which
    in the teacher reads the output of layer kᵢ₊₁ − 1; the last student layer stands for the teacher's last layer.
    Any other student: the proportional layer ⌈(i + 1)·N_t / N_s⌉ − 1 (TinyBERT's uniform mapping).
    """
    if kept is not None:
        return kept[layer + 1] - 1 if layer + 1 < len(kept) else teacher_layers - 1
    return -(-(layer + 1) * teacher_layers // student_layers) - 1
