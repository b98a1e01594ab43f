"""GPTQ over a whole checkpoint, one layer at a time (the decoder layers of a causal LM, the encoder layers of a text
encoder): only that layer's weights and the calibration activations are in memory.

1. The model's class is built on the meta device from config.json (no memory). The modules before the first decoder
   layer (the token embedding, the rotary embedding) are materialised from the checkpoint, and the calibration
   samples (one text per line, tokenised with the checkpoint's tokenizer, unpadded) run through them once with each
   decoder layer replaced by a catcher that records its inputs: the embedded hidden states, and per layer the
   keyword arguments the model passes (position embeddings, attention mask, …).
2. For each layer in order: its weights are read from the streamed checkpoint into the meta layer
   (``load_state_dict(assign=True)``); forward pre-hooks gather H = 2XᵀX / n of every quantized Linear's inputs X
   over all calibration tokens; each Linear is quantized with ``gptq.gptq_int4``; the layer, its weights replaced by
   the quantized ones, then turns the activations into the next layer's inputs, and goes back to the meta device.

Hessians, solves and the layer's forward run on ``device``. ``GPTQView`` is the lazy view ``quantize`` writes: its
decoder layers come in index order, so each layer is calibrated once, when its first tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weightsmith.architecture import LAYERWISE_DECODERS, LAYERWISE_ENCODERS, layer_index, model_type
from weightsmith.checkpoint import TensorSource
from weightsmith.compress.quantize.gptq import gptq_int4, output_error
from weightsmith.compress.quantize.int4 import dequantize_int4, pack_module, quantize_int4
from weightsmith.compress.quantize.schemes import GPTQ, Int4
from weightsmith.compress.quantize.targets import Plan
from weightsmith.compress.quantize.view import QuantizedView
from weightsmith.errors import CheckpointError, ConfigError, IncompatibleError

__all__ = ["GPTQView", "LayerwiseGPTQ", "check_calibrated"]


def check_calibrated(ckpt: TensorSource, scheme: Int4) -> None:
    """Every refusal of a GPTQ run, before anything is computed: the family, the tokenizer, the calibration file."""
    from weightsmith.evaluation import is_causal_lm, read_texts, require_tokenizer

    assert scheme.gptq is not None
    family = model_type(ckpt.config)
    decoder = family in LAYERWISE_DECODERS and is_causal_lm(ckpt.config)
    if ckpt.config is None or not (decoder or family in LAYERWISE_ENCODERS):
        families = ", ".join(sorted(LAYERWISE_DECODERS | LAYERWISE_ENCODERS))
        raise IncompatibleError(
            f"{ckpt.path}: GPTQ runs decoder-only language models and text encoders layer by layer "
            f"({families}); this is {family or 'a model without config.json'}"
        )
    require_tokenizer(ckpt.path)
    read_texts(scheme.gptq.calibration, what="calibration file")


class GPTQView(QuantizedView):
    """``QuantizedView`` whose decoder layers are quantized by GPTQ (``LayerwiseGPTQ``); weights outside the decoder
    layers that are quantized at all (none with the default ``ignore``) are rounded to nearest."""

    def __init__(self, source: TensorSource, scheme: Int4, selection: Plan, ignore: Sequence[str] | None, device: str):
        super().__init__(source, scheme, selection, ignore)
        self.int4, self.device = scheme, device
        self._driver: LayerwiseGPTQ | None = None
        self.source_order = _layer_major(list(source))
        self._order = _layer_major(self._order)

    def quantized(self, weight: str, tensor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        index = layer_index(weight)
        if index is None:
            return super().quantized(weight, tensor)
        if self._driver is None:
            self._driver = LayerwiseGPTQ(self.source, self.int4, self.selection.targets, device=self.device)
        return self._driver.layer(index)[weight]

    @property
    def details(self) -> dict[str, Any]:
        return {} if self._driver is None else {"gptq": self._driver.summary()}


def _layer_major(names: list[str]) -> list[str]:
    """The tensors before the first decoder layer, then layer 0, 1, … (numeric order, stable inside a layer), then
    the rest: the order in which each layer is calibrated once."""
    first = next((i for i, name in enumerate(names) if layer_index(name) is not None), len(names))
    rest = names[first:]
    in_layers = sorted(
        (name for name in rest if layer_index(name) is not None), key=lambda name: layer_index(name) or 0
    )
    return names[:first] + in_layers + [name for name in rest if layer_index(name) is None]


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


class LayerwiseGPTQ:
    """The calibration state of one GPTQ run over ``ckpt``: the activations entering the next layer, and the stored
    int4 tensors of the layer computed last. ``layer(i)`` advances through the layers up to ``i``."""

    def __init__(self, ckpt: TensorSource, scheme: Int4, targets: Sequence[str], *, device: str = "cpu"):
        assert scheme.gptq is not None
        self.ckpt, self.scheme, self.gptq, self.device = ckpt, scheme, scheme.gptq, torch.device(device)
        self.targets = set(targets)
        base, self.prefix, self.layers, config = _skeleton(ckpt)
        samples = _calibration_ids(ckpt, self.gptq)
        self.tokens = sum(int(ids.shape[1]) for ids in samples)
        self.hidden, self.inputs = _capture(base, self.layers, samples, self.device)
        del base
        self.next = 0
        self.parts: dict[str, dict[str, torch.Tensor]] = {}
        self.rows: list[dict[str, Any]] = []

    def layer(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        """{source weight name: its stored int4 tensors} for decoder layer ``index`` (layers are computed in order;
        only the last one's tensors are kept)."""
        if index < self.next - 1:
            raise RuntimeError(f"gptq: layer {index} was requested after layer {self.next - 1}")
        while self.next <= index:
            self.parts = self._run(self.next)
            self.next += 1
        return self.parts

    def summary(self) -> dict[str, Any]:
        gptq = sum(r["gptq_error"] ** 2 for r in self.rows) ** 0.5
        rtn = sum(r["rtn_error"] ** 2 for r in self.rows) ** 0.5
        return {
            "calibration": self.gptq.calibration,
            "tokens": self.tokens,
            "device": str(self.device),
            "output_error_vs_rtn": round(gptq / rtn, 4) if rtn else None,
            "tensors": self.rows,
        }

    def _run(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        layer = self.layers[index]
        _load_layer(layer, self.ckpt, f"{self.prefix}{index}.", self.device)
        linears = {
            f"{self.prefix}{index}.{name}.weight": module
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and f"{self.prefix}{index}.{name}.weight" in self.targets
        }
        inputs = self.inputs[index]
        hessians = _hessians(layer, linears, self.hidden, inputs)
        parts = {}
        for name, module in linears.items():
            parts[name] = self._quantize(name, module, hessians.pop(name))
        with torch.no_grad():
            self.hidden = [_output(layer(h, *x["args"], **x["kwargs"])) for h, x in zip(self.hidden, inputs)]
        self.inputs[index] = []
        self.layers[index] = layer.to("meta")  # free the layer's weights
        return parts

    def _quantize(self, name: str, module: nn.Linear, hessian: torch.Tensor) -> dict[str, torch.Tensor]:
        """GPTQ for one Linear; its weight in the layer becomes the quantized one, for the layers that follow."""
        w = self.ckpt[name].to(self.device)  # the stored dtype: scales are rounded to it
        g, asym = self.scheme.group_size, self.scheme.asymmetric
        block = self.gptq.block_size if not g or self.gptq.block_size % g == 0 or g % self.gptq.block_size == 0 else g
        q, scale, zero = gptq_int4(
            w, hessian, group_size=g, asymmetric=asym, damp=self.gptq.damp, block_size=block,
            act_order=self.gptq.act_order,
        )  # fmt: skip
        w_hat = dequantize_int4(q, scale, zero, dtype=torch.float32)
        rtn_hat = dequantize_int4(*quantize_int4(w, g, asym), dtype=torch.float32)
        self.rows.append(
            {
                "tensor": name,
                "gptq_error": output_error(w, w_hat, hessian),
                "rtn_error": output_error(w, rtn_hat, hessian),
            }
        )
        module.weight.data = w_hat
        return pack_module(q.cpu(), scale.cpu(), None if zero is None else zero.cpu())


def _skeleton(ckpt: TensorSource) -> tuple[nn.Module, str, nn.ModuleList, Any]:
    """The checkpoint's base model on the meta device with everything outside the decoder layers materialised;
    the name prefix of the layers (``model.layers.``) and the layer list."""
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
            outside[name] = ckpt[stored].float()
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


def _calibration_ids(ckpt: TensorSource, gptq: GPTQ) -> list[torch.Tensor]:
    from weightsmith.evaluation import encode, load_tokenizer, read_texts

    texts = read_texts(gptq.calibration, what="calibration file")
    samples = encode(load_tokenizer(ckpt.path), texts[: gptq.samples], gptq.seq_len)
    if not samples:
        raise ConfigError(f"{gptq.calibration}: calibration file encodes to no tokens")
    return samples


def _capture(
    base: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Run the samples through the materialised embedding with every layer a catcher: the hidden states entering
    layer 0 (one [1, T, hidden] per sample) and each layer's other inputs per sample, all on ``device``."""
    records: list[list[dict[str, Any]]] = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(i, i == len(originals) - 1, layer, records[i])
    try:
        with torch.no_grad():
            for ids in samples:
                try:
                    base(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden = [_to(r["hidden"], device) for r in records[0]]
    inputs = [[{"args": _to(r["args"], device), "kwargs": _to(r["kwargs"], device)} for r in rec] for rec in records]
    return hidden, inputs


def _to(value: Any, device: torch.device) -> Any:
    """Tensors inside tuples, lists and dicts moved to ``device`` (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _load_layer(layer: nn.Module, ckpt: TensorSource, prefix: str, device: torch.device) -> None:
    """The layer's parameters read from the checkpoint (float32, on ``device``) into the meta module."""
    names = list(layer.state_dict())
    missing = [f"{prefix}{k}" for k in names if f"{prefix}{k}" not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tensor {missing[0]!r} is missing ({len(missing)} of the layer's)")
    state = {k: ckpt[f"{prefix}{k}"].to(device=device, dtype=torch.float32) for k in names}
    layer.load_state_dict(state, strict=True, assign=True)
    if any(b.is_meta for b in layer.buffers()):
        raise IncompatibleError(f"{ckpt.path}: layer {prefix!r} holds buffers that are not in the checkpoint")


def _hessians(
    layer: nn.Module, linears: Mapping[str, nn.Module], hidden: list[torch.Tensor], inputs: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """H = 2XᵀX / n [in, in] of each Linear's inputs X [n tokens, in] over every calibration sample, in float32."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for h, x in zip(hidden, inputs):
                layer(h, *x["args"], **x["kwargs"])
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2 * sums[name] / counts[name] for name in linears}


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
