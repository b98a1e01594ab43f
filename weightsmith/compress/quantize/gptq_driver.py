"""GPTQ over a whole checkpoint, one decoder layer at a time: only that layer's weights and the calibration
activations are in memory (the layer-at-a-time machinery is ``weightsmith.layerwise``).

1. The model's class is built on the meta device from config.json (no memory). The modules before the first decoder
   layer (the token embedding, the rotary embedding) are materialised from the checkpoint, and the calibration
   samples (one text per line, tokenised with the checkpoint's tokenizer, unpadded) run through them once with each
   decoder layer replaced by a catcher that records its inputs: the embedded hidden states, and per layer the
   keyword arguments the model passes (position embeddings, attention mask, …).
2. For each layer in order: its weights are read from the streamed checkpoint into the meta layer
   (``load_state_dict(assign=True)``); forward pre-hooks gather H = 2XᵀX / n of every quantized Linear's inputs X
   over all calibration tokens; the Linears' weights are then dropped (each is read again from the checkpoint when
   its turn comes: while the widest one is solved, the others are not in memory) and each is quantized with
   ``gptq.gptq_int4``; the layer, its weights now the quantized ones, turns the activations into the next layer's
   inputs, and goes back to the meta device.

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
from weightsmith.compress.quantize.int4 import dequantize_int4, dequantize_module, pack_module, quantize_int4
from weightsmith.compress.quantize.schemes import GPTQ, Int4
from weightsmith.compress.quantize.targets import Plan
from weightsmith.compress.quantize.view import QuantizedView
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.layerwise import capture, layer_output, load_layer, skeleton

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

    calibrated = True

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


class LayerwiseGPTQ:
    """The calibration state of one GPTQ run over ``ckpt``: the activations entering the next layer, and the stored
    int4 tensors of the layer computed last. ``layer(i)`` advances through the layers up to ``i``."""

    def __init__(self, ckpt: TensorSource, scheme: Int4, targets: Sequence[str], *, device: str = "cpu"):
        assert scheme.gptq is not None
        self.ckpt, self.scheme, self.gptq, self.device = ckpt, scheme, scheme.gptq, torch.device(device)
        self.targets = set(targets)
        base, self.prefix, self.layers, config = skeleton(ckpt)
        samples = _calibration_ids(ckpt, self.gptq)
        self.tokens = sum(int(ids.shape[1]) for ids in samples)
        self.hidden, self.inputs = capture(base, self.layers, samples, self.device)
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
        load_layer(layer, self.ckpt, f"{self.prefix}{index}.", self.device)
        linears = {
            f"{self.prefix}{index}.{name}.weight": module
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and f"{self.prefix}{index}.{name}.weight" in self.targets
        }
        inputs = self.inputs[index]
        hessians = _hessians(layer, linears, self.hidden, inputs)
        for module in linears.values():  # GPTQ reads each weight from the checkpoint: none need stay meanwhile
            module.weight.data = torch.empty(0, device=self.device)
        parts = {name: self._quantize(name, hessians.pop(name)) for name in linears}
        for name, module in linears.items():  # the quantized weights carry the error on to the next layer
            module.weight.data = dequantize_module(parts[name], torch.float32).to(self.device)
        with torch.no_grad():
            self.hidden = [layer_output(layer(h, *x["args"], **x["kwargs"])) for h, x in zip(self.hidden, inputs)]
        self.inputs[index] = []
        self.layers[index] = layer.to("meta")  # free the layer's weights
        return parts

    def _quantize(self, name: str, hessian: torch.Tensor) -> dict[str, torch.Tensor]:
        """GPTQ for one Linear: its stored int4 tensors (and its output error against round-to-nearest's)."""
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
        return pack_module(q.cpu(), scale.cpu(), None if zero is None else zero.cpu())


def _calibration_ids(ckpt: TensorSource, gptq: GPTQ) -> list[torch.Tensor]:
    from weightsmith.evaluation import encode, load_tokenizer, read_texts

    texts = read_texts(gptq.calibration, what="calibration file")
    samples = encode(load_tokenizer(ckpt.path), texts[: gptq.samples], gptq.seq_len)
    if not samples:
        raise ConfigError(f"{gptq.calibration}: calibration file encodes to no tokens")
    return samples


def _hessians(
    layer: nn.Module, linears: Mapping[str, nn.Module], hidden: list[torch.Tensor], inputs: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """H = 2XᵀX / n [in, in] of each Linear's inputs X [n tokens, in] over every calibration sample, in float32.

    Linears that read one tensor (q, k and v; gate and up) share one H: XᵀX is added once, straight into the sum of
    the first of them (``addmm_``, no product buffer). Which Linears share is learnt from the first sample; should a
    later one pair them differently, the pass is run again with a sum per Linear."""
    try:
        return _hessian_pass(layer, linears, hidden, inputs, shared=True)
    except _Regrouped:
        return _hessian_pass(layer, linears, hidden, inputs, shared=False)


class _Regrouped(Exception):
    """A calibration sample fed the layer's Linears from other tensors than the first sample did."""


def _hessian_pass(
    layer: nn.Module,
    linears: Mapping[str, nn.Module],
    hidden: list[torch.Tensor],
    inputs: list[dict[str, Any]],
    *,
    shared: bool,
) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    leader_of: dict[str, str] = {}  # each Linear -> the Linear whose sum holds its H (itself, unless shared)
    last: list[Any] = [None, -1, None]  # the tensor the previous hook saw, its in-place version, its leader
    first = [True]  # still in the first sample: the grouping is being learnt

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0]
            follows = shared and x is last[0] and x._version == last[1]
            leader = last[2] if follows else name
            if first[0]:
                leader_of[name] = leader
            elif leader_of.get(name) != leader:
                raise _Regrouped
            if not follows:
                flat = x.detach().float().reshape(-1, x.shape[-1])  # (tokens, in)
                if name in sums:
                    sums[name].addmm_(flat.T, flat)
                else:
                    sums[name] = flat.T @ flat
                last[:] = [x, x._version, name]
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for h, x in zip(hidden, inputs):
                layer(h, *x["args"], **x["kwargs"])
                first[0] = False
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    for leader in set(leader_of.values()):
        sums[leader].mul_(2).div_(counts[leader])  # 2·Σ/n in place, once per shared sum
    return {name: sums[leader_of[name]] for name in linears}
