"""The merge plan: every output tensor, where each of its inputs is read from, and its resolved parameters — fixed
from the inputs' headers and configs before any weight is read, so a bad config fails in seconds.

A ``models:`` merge maps each tensor name to the same name in every input. A ``slices:`` merge follows mergekit:
the output's layers are the slices' layers in order, renumbered from 0; within a slice of n layers, output layer
``offset + k`` merges layer ``start + k`` of each source, at gradient position t = k/(n−1) (1 when n = 1). Tensors
outside the layers come from the first slice's sources when they are input embeddings (names holding ``embed``,
``wte`` or ``wpe``) and from the last slice's sources otherwise (final norm, output head), at t = 0. The layer
count of the output config (``num_hidden_layers``, ``n_layer`` or ``num_layers``) is rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith import architecture
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.merge.config import MergeConfig, SliceConfig, gradient_position, layer_index, resolve
from weightsmith.merge.table import METHODS
from weightsmith.merge.vocab import is_vocab_tensor

_PRE = ("embed", "wte", "wpe")  # non-layer tensors taken from the first slice


@dataclass(frozen=True)
class Task:
    """One output tensor: its name, where its base and inputs are read (model path, tensor name), the resolved
    parameters, and its output dtype."""

    name: str
    base: tuple[str, str] | None
    inputs: tuple[tuple[str, str], ...]
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]
    dtype: torch.dtype
    vocab: bool = False  # token-indexed (dim 0): re-indexed into the output vocabulary before merging

    @property
    def primary(self) -> tuple[str, str]:
        return self.base or self.inputs[0]


def plan(cfg: MergeConfig, opened: Mapping[str, Any], out_dtype: torch.dtype | None) -> tuple[list[Task], dict | None]:
    """The tasks in output order and the output config (None when the primary input has none)."""
    if cfg.slices:
        return _plan_slices(cfg, opened, out_dtype)
    refs = ([cfg.base] if cfg.base else []) + list(cfg.inputs)
    labels = [r.path for r in refs]
    names = check_compatible(labels, [opened[p] for p in labels], vocab=cfg.tokenizer is not None)
    primary = opened[labels[0]]
    num_layers = architecture.num_layers(getattr(primary, "config", None), names)
    tasks = []
    for name in names:
        shared, per_model = resolve(cfg, name, gradient_position(name, num_layers))
        tasks.append(
            _task(
                cfg,
                name,
                (cfg.base.path, name) if cfg.base else None,
                [(r.path, name) for r in cfg.inputs],
                shared,
                per_model,
                primary.info(name).dtype,
                out_dtype,
            )
        )
    return tasks, getattr(primary, "config", None)


def _task(
    cfg: MergeConfig,
    name: str,
    base: tuple[str, str] | None,
    inputs: list[tuple[str, str]],
    shared: dict,
    per_model: list[dict],
    stored: torch.dtype,
    out_dtype: torch.dtype | None,
) -> Task:
    target = out_dtype if out_dtype is not None and stored.is_floating_point else stored
    task = Task(
        name, base, tuple(inputs), shared, per_model, target, cfg.tokenizer is not None and is_vocab_tensor(name)
    )
    METHODS[cfg.method].check(f"tensor {name!r}", [p for p, _ in inputs], shared, per_model)
    return task


def check_compatible(
    labels: Sequence[str], inputs: Sequence[Mapping[str, torch.Tensor]], vocab: bool = False
) -> list[str]:
    """The tensor names of the first input, after checking every input holds the same names and shapes (with
    ``vocab``, token-indexed tensors need only agree beyond dim 0, and vocabulary sizes may differ)."""
    first = inputs[0]
    problems = []
    names = list(first)
    for label, ckpt in zip(labels[1:], inputs[1:]):
        missing = [n for n in names if n not in ckpt]
        extra = [n for n in ckpt if n not in first]
        if missing:
            problems.append(f"{label} lacks {len(missing)} tensor(s) of {labels[0]}, e.g. {missing[0]!r}")
        if extra:
            problems.append(f"{label} has {len(extra)} tensor(s) {labels[0]} lacks, e.g. {extra[0]!r}")
        for n in names:
            if n in ckpt and not _same_shape(first.info(n).shape, ckpt.info(n).shape, vocab and is_vocab_tensor(n)):  # type: ignore[attr-defined]
                problems.append(
                    f"{n!r} is {list(ckpt.info(n).shape)} in {label} but {list(first.info(n).shape)} in {labels[0]}"  # type: ignore[attr-defined]
                )
        if not vocab:
            problems += _vocab_problems(labels[0], first, label, ckpt)
    _raise(problems)
    return names


def _same_shape(a: Sequence[int], b: Sequence[int], token_indexed: bool) -> bool:
    return tuple(a[1:]) == tuple(b[1:]) if token_indexed else tuple(a) == tuple(b)


def _vocab_problems(label_a: str, a: Any, label_b: str, b: Any) -> list[str]:
    vocab_a = (getattr(a, "config", None) or {}).get("vocab_size")
    vocab_b = (getattr(b, "config", None) or {}).get("vocab_size")
    if vocab_a is not None and vocab_b is not None and vocab_a != vocab_b:
        return [f"vocab_size {vocab_b} in {label_b} but {vocab_a} in {label_a}"]
    return []


def _raise(problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise IncompatibleError(
            f"inputs do not match: {shown}: merge models of one architecture and size (a slice's layer_range picks "
            "layers; tokenizer_source merges different vocabularies)"
        )


def renumber(name: str, index: int) -> str:
    """``model.layers.7.mlp.up_proj.weight`` with its layer index replaced."""
    split = architecture.split_layer(name)
    if split is None:
        return name
    prefix, _, rest = split
    return f"{prefix}.{index}.{rest}"


# ---------------------------------------------------------------------------------------------------------------
# slices


def _plan_slices(
    cfg: MergeConfig, opened: Mapping[str, Any], out_dtype: torch.dtype | None
) -> tuple[list[Task], dict | None]:
    layers: dict[str, dict[int, list[str]]] = {}  # model → layer index → its tensor names
    depth: dict[str, int] = {}
    for path, ckpt in opened.items():
        by_layer: dict[int, list[str]] = {}
        for n in ckpt:
            i = layer_index(n)
            if i is not None:
                by_layer.setdefault(i, []).append(n)
        layers[path] = by_layer
        depth[path] = architecture.num_layers(getattr(ckpt, "config", None), list(ckpt))
    for i, sl in enumerate(cfg.slices):
        for ref in sl.sources():
            start, end = ref.layer_range or (0, 0)
            if end > depth[ref.path]:
                raise ConfigError(
                    f"slices[{i}]: layer_range [{start}, {end}] of {ref.path} is past its depth "
                    f"({depth[ref.path]} layers): use an end of at most {depth[ref.path]}"
                )

    first, last = cfg.slices[0], cfg.slices[-1]
    primary_path = first.sources()[0].path
    primary = opened[primary_path]
    problems: list[str] = []
    paths = list(dict.fromkeys(r.path for sl in cfg.slices for r in sl.sources()))
    for p in paths[1:] if cfg.tokenizer is None else []:
        problems += _vocab_problems(paths[0], opened[paths[0]], p, opened[p])

    def make(name: str, part: SliceConfig, source_names: list[str], t: float) -> Task | None:
        refs = part.sources()
        infos = []
        for ref, src in zip(refs, source_names):
            if src not in opened[ref.path]:
                problems.append(f"{ref.path} lacks {src!r}")
                return None
            infos.append(opened[ref.path].info(src))
        for ref, info in zip(refs[1:], infos[1:]):
            if not _same_shape(info.shape, infos[0].shape, cfg.tokenizer is not None and is_vocab_tensor(name)):
                problems.append(f"{info.name!r} is {list(info.shape)} in {ref.path} but {list(infos[0].shape)}")
        shared, per_model = resolve(cfg, name, t, part)
        pairs = list(zip((r.path for r in refs), source_names))
        base = pairs.pop(0) if part.base is not None else None
        return _task(cfg, name, base, pairs, shared, per_model, infos[0].dtype, out_dtype)

    outside = [n for n in primary if layer_index(n) is None]
    pre = [n for n in outside if any(k in n for k in _PRE)]
    post = [n for n in outside if n not in pre]
    tasks: list[Task | None] = [make(n, first, [n] * len(first.sources()), 0.0) for n in pre]
    offset = 0
    layer_types: list[Any] = []
    for sl in cfg.slices:
        n = sl.length
        lead = sl.sources()[0]
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            src_index = (lead.layer_range or (0, 0))[0] + k
            for name in layers[lead.path].get(src_index, []):
                sources = [renumber(name, (r.layer_range or (0, 0))[0] + k) for r in sl.sources()]
                tasks.append(make(renumber(name, offset + k), sl, sources, t))
            types = (getattr(opened[lead.path], "config", None) or {}).get("layer_types")
            if isinstance(types, list) and src_index < len(types):
                layer_types.append(types[src_index])
        offset += n
    tasks += [make(n, last, [n] * len(last.sources()), 0.0) for n in post]
    _raise(problems)

    base_path = cfg.base.path if cfg.base and cfg.base.path in opened else primary_path
    config = getattr(opened[base_path], "config", None)
    if config is not None:
        config = dict(config)
        key = next((k for k in architecture.LAYER_COUNT_KEYS if isinstance(config.get(k), int)), "num_hidden_layers")
        config[key] = offset
        if isinstance(config.get("layer_types"), list) and len(layer_types) == offset:
            config["layer_types"] = layer_types
    return [t for t in tasks if t is not None], config
