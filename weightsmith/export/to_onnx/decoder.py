"""A causal LM with its KV cache as one ONNX graph: the first step (an empty past, sequence length 0) and the
cached steps run the same graph, as optimum's merged decoder does.

Inputs ``input_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence), ``position_ids`` (batch,
sequence) where the model takes them, and ``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, past,
head_dim); outputs ``logits`` (batch, sequence, vocab) and ``present.{i}.key`` / ``.value`` (batch, kv_heads,
past + sequence, head_dim): optimum's ``-with-past`` names. transformers 5 passes the cache as a ``DynamicCache``
object (its ``cache`` argument and output), so a small module takes and returns flat tensors around it.
Exporter: the TorchScript one (``dynamo=False``), whose named dynamic axes take the zero-length past that
torch.export's symbolic dims specialise away.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsmith.errors import IncompatibleError
from weightsmith.export.to_onnx.build import export_error, quiet_exporter

# The TorchScript exporter's default here is 18; 17 is what onnxruntime's int8 quantizer and optimum's decoders use.
TORCHSCRIPT_OPSET = 17


@dataclass(frozen=True)
class CacheShape:
    """The KV cache of a decoder: ``layers`` entries of (batch, ``heads``, past, ``head_dim``) keys and values."""

    layers: int
    heads: int
    head_dim: int
    positions: bool  # the model takes ``position_ids``

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *(["position_ids"] if self.positions else []), *self.past_names()]

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.heads, 0, self.head_dim) for _ in range(2 * self.layers)]


def cache_shape(model: torch.nn.Module) -> CacheShape:
    """Read from one forward with a cache (head counts and widths differ by architecture: GQA, head_dim ≠ h/n)."""
    with torch.no_grad():
        cache = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True).cache
    if not all(hasattr(layer, "keys") for layer in cache.layers):
        kind = type(next(layer for layer in cache.layers if not hasattr(layer, "keys"))).__name__
        raise IncompatibleError(
            f"{type(model).__name__}: its cache is not attention keys and values ({kind}); the ONNX export with a "
            "cache covers attention decoders"
        )
    keys = [layer.keys for layer in cache.layers]  # (1, kv_heads, 1, head_dim) each
    positions = "position_ids" in inspect.signature(model.forward).parameters
    return CacheShape(len(keys), keys[0].shape[1], keys[0].shape[3], positions)


class CachedDecoder(torch.nn.Module):
    """Flat tensors in, flat tensors out: (input_ids, attention_mask, [position_ids], *past) → (logits, *present)."""

    def __init__(self, model: torch.nn.Module, shape: CacheShape):
        super().__init__()
        self.model, self.shape = model, shape

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids = rest[0] if self.shape.positions else None
        past = rest[1:] if self.shape.positions else rest
        cache = DynamicCache(config=self.model.config)
        for i in range(self.shape.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {"position_ids": position_ids} if self.shape.positions else {}
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, return_dict=True, **kwargs
        )
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def positions(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """(batch, new) positions of the last ``new`` tokens: the count of real tokens before each one (left padding
    gets position 1, as transformers' ``generate`` gives it)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)[:, -new:]


def example_feeds(shape: CacheShape, vocab: int, batch: int, past: int, new: int, seed: int = 0) -> dict:
    """Random ids and cache; rows after the first are left-padded by one token per row (masked in the past)."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 101 + past * 7 + new)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    for row in range(1, batch):
        mask[row, : min(row, past)] = 0  # left padding lives in the past
    feeds = {"input_ids": torch.randint(0, vocab, (batch, new), generator=gen), "attention_mask": mask}
    if shape.positions:
        feeds["position_ids"] = positions(mask, new)
    for name in shape.past_names():
        feeds[name] = torch.randn(batch, shape.heads, past, shape.head_dim, generator=gen)
    return feeds


def export(decoder: CachedDecoder, vocab: int, path: Path, opset: int | None) -> Path:
    """The TorchScript exporter with named dynamic axes; the example has a non-empty past so nothing specialises."""
    shape = decoder.shape
    feeds = example_feeds(shape, vocab, 2, 3, 4)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in shape.past_names()})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in shape.present_names()})
    path.parent.mkdir(parents=True)
    try:
        with quiet_exporter():
            torch.onnx.export(
                decoder,
                tuple(feeds.values()),
                str(path),
                input_names=list(feeds),
                output_names=["logits", *shape.present_names()],
                dynamic_axes={n: a for n, a in axes.items() if n in feeds or n == "logits" or n.startswith("present")},
                opset_version=opset or TORCHSCRIPT_OPSET,
                dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; each is one unexportable model
        raise export_error(decoder.model, exc) from None
    return path


# (batch, past, new): the first step (empty past), a prompt after a cached prefix, single-token cached steps
PARITY_CASES = ((1, 0, 8), (3, 0, 5), (1, 7, 1), (3, 6, 2), (2, 12, 1))


def parity(decoder: CachedDecoder, sess, vocab: int) -> dict[str, float]:
    """Max |Δ| of ORT vs PyTorch over logits and every present tensor, per case of ``PARITY_CASES``."""
    result = {}
    for batch, past, new in PARITY_CASES:
        feeds = example_feeds(decoder.shape, vocab, batch, past, new, seed=1)
        with torch.no_grad():
            expected = decoder(*feeds.values())
        got = sess.run(None, {n: t.numpy() for n, t in feeds.items()})
        worst = 0.0
        for g, e in zip(got, expected):
            if tuple(g.shape) != tuple(e.shape):
                worst = float("inf")
                break
            worst = max(worst, (torch.from_numpy(g) - e).abs().max().item())
        result[f"{batch}x{past}+{new}"] = worst
    return result
