"""Quantization as a lazy view: ``open_quantized`` checks everything and lays out the output's names, shapes and
config; ``QuantizedView[name]`` quantizes a module when one of its stored tensors is read.

A quantized Linear weight ``<m>.weight`` becomes its format's tensors (int8 W8A8: ``<m>.weight`` + ``<m>.weight_scale``;
W8A16: ``<m>.weight_packed``, ``<m>.weight_scale``, ``<m>.weight_shape``; NF4: ``<m>.weight``, ``<m>.weight.absmax``,
``<m>.weight.quant_map``, …), in the order the codec produces them; every other tensor passes through unchanged.

Only torch and safetensors are imported (plus bitsandbytes when an NF4 module is read).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from weightsmith.checkpoint import CheckpointView, TensorInfo, TensorSource, provenance_step
from weightsmith.compress.quantize.codecs import REGISTRY
from weightsmith.compress.quantize.detect import detect
from weightsmith.compress.quantize.schemes import NF4, Int4, Scheme, make_scheme
from weightsmith.compress.quantize.targets import DEFAULT_IGNORE, Plan, plan
from weightsmith.conversion import as_checkpoint
from weightsmith.device import resolve_device
from weightsmith.errors import ConfigError, IncompatibleError, NumericalError
from weightsmith.numerics import all_finite

__all__ = ["REGISTRY", "QuantizedView", "open_quantized"]


class QuantizedView(CheckpointView):
    """``source`` with its Linear weights quantized lazily; built by ``open_quantized``, which does every check.

    ``info`` gives every output tensor's shape and dtype from the codec's ``describe``, without computing; the one
    exception is NF4 double quant's quant-state tensor, whose length depends on the data (reading its info
    quantizes that module). The last quantized module is kept, so reading a module's tensors one after another
    quantizes it once.
    """

    calibrated = False  # round to nearest, a weight at a time (``GPTQView``: calibrated, a layer at a time)

    def __init__(self, source: TensorSource, scheme: Scheme, selection: Plan, ignore: Sequence[str] | None):
        self.params = {**scheme.to_dict(), "ignore": list(DEFAULT_IGNORE if ignore is None else ignore)}
        super().__init__(source, provenance_step("quantize", self.params, [source]))
        self.scheme, self.codec, self.selection = scheme, REGISTRY[type(scheme)], selection
        self._stored: dict[str, tuple[str, str]] = {}  # output name → (source weight, suffix)
        self._described: dict[str, tuple[tuple[int, ...] | None, torch.dtype]] = {}
        targets = set(selection.targets)
        self._order = []
        for name in source:
            if name not in targets:
                self._order.append(name)
                continue
            info = source.info(name)
            module = name.removesuffix(".weight")
            for suffix, described in self.codec.describe(scheme, info.shape, info.dtype).items():
                out = f"{module}.{suffix}"
                self._order.append(out)
                self._stored[out] = (name, suffix)
                self._described[out] = described
        self._names = set(self._order)
        if source.config is not None:
            self.config = {
                **source.config,
                "quantization_config": self.codec.quantization_config(scheme, selection.kept),
            }
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None  # (source weight, its stored tensors)
        self.source_order: list[str] = list(source)  # the order in which to read the source's tensors

    @property
    def details(self) -> dict[str, Any]:
        """Figures beyond the per-tensor rows, for the report (a calibrated scheme's)."""
        return {}

    @property
    def targets(self) -> list[str]:
        """The source weights that are quantized, in storage order."""
        return self.selection.targets

    def quantized(self, weight: str, tensor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The stored tensors (suffix → tensor) of source weight ``weight``; ``tensor`` is its data if already read."""
        if self._last is not None and self._last[0] == weight:
            return self._last[1]
        tensor = self.source[weight] if tensor is None else tensor
        if not all_finite(tensor):
            raise NumericalError(f"{self.path}: tensor {weight!r} holds NaN or Inf; refusing to quantize it")
        parts = self.codec.quantize_module(self.scheme, tensor)
        self._last = (weight, parts)
        return parts

    @staticmethod
    def stored_items(weight: str, parts: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """``quantized``'s parts under their output names (``<module>.<suffix>``), in the order they are stored."""
        module = weight.removesuffix(".weight")
        return [(f"{module}.{suffix}", value) for suffix, value in parts.items()]

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._stored.get(name)
        if stored is not None:
            return self.quantized(stored[0])[stored[1]]
        return self.source[self._passed(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __repr__(self) -> str:
        return f"QuantizedView({str(self.path)!r}, {self.scheme.label}, {len(self)} tensors)"

    def info(self, name: str) -> TensorInfo:
        stored = self._stored.get(name)
        if stored is None:
            return self.source.info(self._passed(name))
        shape, dtype = self._described[name]
        if shape is None:  # data-dependent (see the class docstring)
            shape = tuple(self.quantized(stored[0])[stored[1]].shape)
        return TensorInfo(name, shape, dtype, self.source.info(stored[0]).file)

    def location(self, name: str) -> tuple[Path, int, int] | None:
        """A passed-through tensor's bytes on disk (copied file to file by the writer); None for quantized ones."""
        return None if name in self._stored else self.source.location(self._passed(name))

    def _passed(self, name: str) -> str:
        """``name`` if it passes through from the source (a quantized weight's own name may not: W8A16 renames it)."""
        if name not in self._names:
            raise KeyError(name)
        return name


def open_quantized(
    src: TensorSource | str | os.PathLike,
    scheme: str | Scheme = "int8",
    *,
    ignore: Sequence[str] | None = None,
    device: str = "cpu",
    **options: Any,
) -> QuantizedView:
    """``src`` with its 2-D Linear weights quantized, as a lazy read-only tensor dict in the output format.

    ``scheme``, ``ignore``, ``device`` and ``options`` as for ``quantize``. Every refusal happens now (a PEFT adapter,
    an already quantized checkpoint, nothing to quantize, a shape the scheme cannot take, an unknown option, a GPTQ
    run's model family, tokenizer or calibration file); reading a tensor can only fail on NaN/Inf in a weight.
    ``config`` carries the format's ``quantization_config``.

    >>> view = ws.compress.quantize.open_quantized("llama", "nf4", double_quant=True)  # doctest: +SKIP
    >>> view.info("model.layers.0.mlp.up_proj.weight.absmax").shape                   # doctest: +SKIP
    """
    config = make_scheme(scheme, **options)
    calibrated = isinstance(config, Int4) and config.gptq is not None
    if str(device).strip().lower() != "cpu" and not calibrated:
        raise ConfigError(f"`device` {device!r} is for GPTQ's calibration; round-to-nearest runs on the CPU")
    device = resolve_device(device)
    ckpt = as_checkpoint(src)
    if ckpt.is_adapter:
        raise IncompatibleError(f"{ckpt.path}: a PEFT adapter; quantize the merged model instead")
    layout = detect(ckpt)
    if layout is not None:
        raise IncompatibleError(
            f"{ckpt.path}: already quantized ({layout.method}"
            f"{', ' + layout.scheme.label if layout.scheme else ''}); dequantize it first"
        )
    selection = plan(ckpt, ignore)
    if not selection.targets:
        why = "; ".join(selection.notes) or "all ignored or none present"
        raise ConfigError(f"{ckpt.path}: no 2-D Linear weights to quantize ({why})")
    if selection.per_expert and not isinstance(config, NF4):  # int8, int4, fp8: compressed-tensors
        raise IncompatibleError(
            f"{ckpt.path}: stores its experts one by one, which transformers fuses on load; the compressed-tensors "
            f"loader cannot fuse them next to quantized modules (nf4 works)"
        )
    codec = REGISTRY[type(config)]
    problems = [p for name in selection.targets if (p := codec.check(config, name, ckpt.info(name).shape))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}")
    if isinstance(config, Int4) and config.gptq is not None:  # `calibrated`, spelled so that the type narrows
        from weightsmith.compress.quantize.gptq_driver import GPTQView, check_calibrated

        check_calibrated(ckpt, config)
        return GPTQView(ckpt, config, selection, ignore, device)
    return QuantizedView(ckpt, config, selection, ignore)
