"""Running a model one layer at a time (a decoder-only LM's decoder layers, a text encoder's encoder layers), with
only that layer's weights in memory.

The model's class is built on the meta device from config.json (no memory) and the modules before the first decoder
layer (the token embedding, the rotary embedding) are materialised from the checkpoint (``skeleton``). The inputs run
through them once with each decoder layer replaced by a catcher that records its inputs (``capture``): the embedded
hidden states, and per layer the keyword arguments the model passes (position embeddings, attention mask, …). A
caller then loads each layer's weights from the streamed checkpoint into the meta layer (``load_layer``), runs the
recorded inputs through it (``layer_output``) to get the next layer's hidden states, and moves it back to the meta
device.

Used by GPTQ (``compress.quantize.gptq_driver``) and by the MoE merge's ``hidden`` routers (``merge.hidden``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weightsmith.checkpoint import TensorSource
from weightsmith.errors import CheckpointError, IncompatibleError

__all__ = ["capture", "layer_output", "load_layer", "skeleton", "to_device"]


class _Stop(Exception):
    """Raised by the last layer's catcher: the calibration pass needs nothing after the decoder layers."""


class _Catcher(nn.Module):
    """Decoder layer ``index``'s stand-in during the capture pass: records its inputs, passes the hidden states on."""

    def __init__(self, index: int, last: bool, layer: nn.Module, record: list[dict[str, Any]]):
        super().__init__()
        self.index, self.last, self.record = index, last, record
        if hasattr(layer, "attention_type"):  # models that pick the layer's mask by its attention type
            self.attention_type = layer.attention_type

    def forward(self, hidden, *args, **kwargs):
        self.record.append({"hidden": hidden, "args": args, "kwargs": kwargs})
        if self.last:
            raise _Stop
        return hidden


def skeleton(ckpt: TensorSource, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str, nn.ModuleList, Any]:
    """The checkpoint's base model on the meta device with everything outside the decoder layers materialised (in
    ``dtype``); the name prefix of the layers (``model.layers.``) and the layer list."""
    import transformers

    config = transformers.AutoConfig.for_model(**dict(ckpt.config or {}))
    arch = next((a for a in (ckpt.config or {}).get("architectures") or [] if hasattr(transformers, a)), None)
    if arch is None:
        raise IncompatibleError(f"{ckpt.path}: config.json names no transformers model class in 'architectures'")
    with torch.device("meta"):
        model = getattr(transformers, arch)(config)
    base = model.base_model
    prefix = f"{model.base_model_prefix}." if base is not model else ""
    if not any(name.startswith(prefix) for name in ckpt):
        prefix = ""  # a base model saved without its head
    n = config.num_hidden_layers
    layers_name = next(
        (name for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n), None
    )  # ``layers`` of a decoder, ``encoder.layer`` of an encoder
    if layers_name is None:
        raise IncompatibleError(f"{ckpt.path}: cannot find the {n} layers of {type(base).__name__}")
    layers = base.get_submodule(layers_name)
    _rebuild_buffers(base, layers_name, config)  # before the weights: a rebuilt module starts from fresh ones
    outside = {}
    for name, _ in base.named_parameters():
        if not name.startswith(f"{layers_name}."):
            stored = f"{prefix}{name}"
            if stored not in ckpt:
                raise CheckpointError(f"{ckpt.path}: tensor {stored!r} is missing (needed to run the calibration)")
            outside[name] = ckpt[stored].to(dtype)
    base.load_state_dict(outside, strict=False, assign=True)
    return base, f"{prefix}{layers_name}.", layers, config


def _rebuild_buffers(base: nn.Module, layers_name: str, config: Any) -> None:
    """Modules outside the layers whose buffers are computed at construction (rotary ``inv_freq``), built again on
    the CPU: the meta device left them without values."""
    for name, module in list(base.named_modules()):
        if name.startswith(layers_name) or not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        parent, _, attr = name.rpartition(".")
        try:
            fresh = type(module)(config=config)
        except TypeError as exc:
            why = f"{type(base).__name__}: cannot rebuild {name!r} off the meta device ({exc})"
            raise IncompatibleError(why) from None
        setattr(base.get_submodule(parent) if parent else base, attr, fresh)


def capture(
    base: nn.Module, layers: nn.ModuleList, samples: Sequence[torch.Tensor | Mapping[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Run the samples (token ids [B, T], or the model's keyword arguments: ids and attention mask) through the
    materialised embedding with every layer a catcher: the hidden states entering layer 0 (one [B, T, hidden] per
    sample) and each layer's other inputs per sample, all on ``device``."""
    records: list[list[dict[str, Any]]] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(i, i == len(originals) - 1, layer, records[i])
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    base(**(sample if isinstance(sample, Mapping) else {"input_ids": sample}), use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = [to_device(r["hidden"], device) for r in records[0]]
    inputs = [
        [{"args": to_device(r["args"], device), "kwargs": to_device(r["kwargs"], device)} for r in rec]
        for rec in records
    ]
    return hidden, inputs


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside tuples, lists and dicts moved to ``device`` (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def load_layer(
    layer: nn.Module, ckpt: TensorSource, prefix: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> None:
    """The layer's parameters read from the checkpoint (in ``dtype``, on ``device``) into the meta module."""
    names = list(layer.state_dict())
    missing = [f"{prefix}{k}" for k in names if f"{prefix}{k}" not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tensor {missing[0]!r} is missing ({len(missing)} of the layer's)")
    state = {k: ckpt[f"{prefix}{k}"].to(device=device, dtype=dtype) for k in names}
    layer.load_state_dict(state, strict=True, assign=True)
    if any(b.is_meta for b in layer.buffers()):
        raise IncompatibleError(f"{ckpt.path}: layer {prefix!r} holds buffers that are not in the checkpoint")


def layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
