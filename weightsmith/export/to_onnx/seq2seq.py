"""Encoder-decoder models (T5, BART, Whisper) as optimum's three graphs: the encoder, the decoder's first step and
its cached steps.

``encoder_model.onnx``: ``input_ids``, ``attention_mask`` (Whisper: ``input_features``) → ``last_hidden_state``.
``decoder_model.onnx`` (the first step): ``input_ids``, ``encoder_attention_mask`` (not Whisper),
``encoder_hidden_states`` → ``logits``, ``present.{i}.decoder.key`` / ``.value`` (batch, heads, decoder sequence,
head_dim) and ``present.{i}.encoder.key`` / ``.value`` (batch, heads, encoder sequence, head_dim).
``decoder_with_past_model.onnx``: ``input_ids``, ``encoder_attention_mask``, ``past_key_values.{i}.decoder.*`` and
``past_key_values.{i}.encoder.*`` → ``logits`` and the decoder presents (the encoder's keys and values do not
change). transformers 5 passes the caches as an ``EncoderDecoderCache``; a small module turns flat tensors into one
and back. Exporter: the TorchScript one (``dynamo=False``) with named dynamic axes, as for the cached decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import IncompatibleError
from weightsmith.export.to_onnx.build import export_error, quiet_exporter
from weightsmith.export.to_onnx.decoder import TORCHSCRIPT_OPSET

# optimum's file names for the three graphs, in the order they are placed
ENCODER, DECODER, DECODER_WITH_PAST = "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"
GRAPHS = (ENCODER, DECODER, DECODER_WITH_PAST)
_KINDS = tuple((side, kv) for side in ("decoder", "encoder") for kv in ("key", "value"))


@dataclass(frozen=True)
class Seq2SeqShape:
    """What the graphs' names and example inputs depend on."""

    layers: int  # decoder layers
    d_model: int
    vocab: int
    speech: bool  # Whisper: input_features (batch, mel bins, frames) in, no encoder attention mask
    start: int  # the decoder start token the greedy checks begin from
    features: tuple[int, int] = (0, 0)  # (mel bins, frames) of a speech encoder

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{side}.{kv}" for i in range(self.layers) for side, kv in _KINDS]

    def present_names(self, cross: bool) -> list[str]:
        kinds = _KINDS if cross else _KINDS[:2]
        return [f"present.{i}.{side}.{kv}" for i in range(self.layers) for side, kv in kinds]

    def encoder_inputs(self) -> list[str]:
        return ["input_features"] if self.speech else ["input_ids", "attention_mask"]

    def decoder_inputs(self, with_past: bool) -> list[str]:
        mask = [] if self.speech else ["encoder_attention_mask"]
        return ["input_ids", *mask, *(self.past_names() if with_past else ["encoder_hidden_states"])]


def seq2seq_shape(model: Any) -> Seq2SeqShape:
    config = model.config
    layers = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
    layers = layers or config.num_layers  # T5 without num_decoder_layers: the encoder's count
    speech = getattr(model, "main_input_name", "input_ids") == "input_features"  # Whisper
    features = (config.num_mel_bins, 2 * config.max_source_positions) if speech else (0, 0)
    start = config.decoder_start_token_id
    start = start if start is not None else getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        raise IncompatibleError(f"model {type(model).__name__}: no decoder_start_token_id in its config to decode from")
    return Seq2SeqShape(int(layers), config.d_model, config.vocab_size, speech, int(start), features)


class Encoder(torch.nn.Module):
    """(input_ids, attention_mask) or (input_features,) → last_hidden_state."""

    def __init__(self, model: Any, shape: Seq2SeqShape):
        super().__init__()
        self.encoder, self.names = model.get_encoder(), shape.encoder_inputs()

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.encoder(**dict(zip(self.names, tensors)), return_dict=True).last_hidden_state


class Decoder(torch.nn.Module):
    """Flat tensors in and out around transformers' ``EncoderDecoderCache``: the first step (``with_past=False``)
    takes ``encoder_hidden_states`` and returns both caches; a cached step takes both caches and returns the
    decoder's (its cross-attention reads the encoder's keys and values from the cache)."""

    def __init__(self, model: Any, shape: Seq2SeqShape, with_past: bool):
        super().__init__()
        self.model, self.shape, self.with_past = model, shape, with_past

    def forward(self, input_ids: torch.Tensor, *rest: torch.Tensor):
        from transformers import DynamicCache, EncoderDecoderCache

        mask, rest = (None, rest) if self.shape.speech else (rest[0], rest[1:])
        own, cross = DynamicCache(config=self.model.config), DynamicCache(config=self.model.config)
        if self.with_past:
            for i in range(self.shape.layers):
                own.update(rest[4 * i], rest[4 * i + 1], i)
                cross.update(rest[4 * i + 2], rest[4 * i + 3], i)
            key = rest[2]  # (batch, heads, encoder sequence, head_dim): unused states of the encoder's shape
            hidden = key.new_zeros(key.shape[0], key.shape[2], self.shape.d_model)
        else:
            hidden = rest[0]
        kwargs = {} if self.shape.speech else {"attention_mask": mask}
        out = self.model(
            encoder_outputs=(hidden,),
            decoder_input_ids=input_ids,
            cache=EncoderDecoderCache(own, cross),
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
        present = []
        for i in range(self.shape.layers):
            present += [out.cache.self_attention_cache.layers[i].keys, out.cache.self_attention_cache.layers[i].values]
            if not self.with_past:
                layer = out.cache.cross_attention_cache.layers[i]
                present += [layer.keys, layer.values]
        return (out.logits, *present)


def encoder_feeds(shape: Seq2SeqShape, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random encoder inputs: token ids right-padded down to ~half length (row 0 full), or standard-normal
    features (batch, mel bins, frames) whose length is the model's (``seq`` unused)."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 101 + seq)
    if shape.speech:
        return {"input_features": torch.randn(batch, *shape.features, generator=gen)}
    lengths = torch.tensor([seq - (i * seq) // (2 * batch) for i in range(batch)])
    return {
        "input_ids": torch.randint(3, shape.vocab, (batch, seq), generator=gen),
        "attention_mask": (torch.arange(seq)[None] < lengths[:, None]).long(),
    }


def decoder_feeds(
    encoder: Encoder, decoder: Decoder, enc: dict[str, torch.Tensor], past: int, new: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of the first step (``past`` 0) or of a cached step after ``past`` decoder tokens, from PyTorch's own
    encoder and first step on ``enc``."""
    gen = torch.Generator().manual_seed(seed * 1000 + past * 7 + new)
    batch, shape = next(iter(enc.values())).shape[0], decoder.shape
    mask = {} if shape.speech else {"encoder_attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        hidden = encoder(*enc.values())
    first = {"input_ids": torch.randint(3, shape.vocab, (batch, past or new), generator=gen), **mask}
    first["encoder_hidden_states"] = hidden
    if not past:
        return first
    with torch.no_grad():
        _, *present = Decoder(decoder.model, shape, with_past=False)(*first.values())
    ids = torch.randint(3, shape.vocab, (batch, new), generator=gen)
    return {"input_ids": ids, **mask, **dict(zip(shape.past_names(), present))}


def _axes(shape: Seq2SeqShape, with_past: bool) -> dict[str, dict[int, str]]:
    axes = {
        "input_features": {0: "batch_size"},
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "last_hidden_state": {0: "batch_size", 1: "encoder_sequence_length"},
        "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
        "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
        "logits": {0: "batch_size", 1: "decoder_sequence_length"},
    }
    self_len = "past_decoder_sequence_length" if with_past else "decoder_sequence_length"
    for name in shape.past_names():
        axes[name] = {0: "batch_size", 2: self_len if ".decoder." in name else "encoder_sequence_length_out"}
    for name in shape.present_names(cross=True):
        total = "past_decoder_sequence_length + 1" if with_past else "decoder_sequence_length"
        axes[name] = {0: "batch_size", 2: total if ".decoder." in name else "encoder_sequence_length_out"}
    if shape.speech:  # frames are fixed; the encoder's output length is the model's
        axes["last_hidden_state"] = {0: "batch_size"}
    return axes


def export_all(encoder: Encoder, decoder: Decoder, folder: Path, opset: int | None) -> dict[str, Path]:
    """The three graphs into ``folder`` under optimum's names; examples of batch 2, encoder length 6, decoder
    length 3 and past 2 (no size-1 dimension, which tracing could fix into the graph)."""
    shape = decoder.shape
    enc = encoder_feeds(shape, 2, 6)
    first = decoder_feeds(encoder, decoder, enc, 0, 3)
    cached = decoder_feeds(encoder, decoder, enc, 2, 2)
    cached_decoder = Decoder(decoder.model, shape, with_past=True).eval()
    jobs = (
        (ENCODER, encoder, enc, ["last_hidden_state"], False),
        (DECODER, decoder, first, ["logits", *shape.present_names(cross=True)], False),
        (DECODER_WITH_PAST, cached_decoder, cached, ["logits", *shape.present_names(cross=False)], True),
    )
    folder.mkdir(parents=True)
    paths = {}
    for name, module, feeds, outputs, with_past in jobs:
        axes = _axes(shape, with_past)
        paths[name] = folder / name
        try:
            with quiet_exporter():
                torch.onnx.export(
                    module,
                    tuple(feeds.values()),
                    str(paths[name]),
                    input_names=list(feeds),
                    output_names=outputs,
                    dynamic_axes={n: axes[n] for n in [*feeds, *outputs]},
                    opset_version=opset or TORCHSCRIPT_OPSET,
                    dynamo=False,
                )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; each is one unexportable model
            raise export_error(decoder.model, exc) from None
    return paths


# (batch, encoder sequence, past, new): first steps of 1 and 4 tokens, cached steps of 1 and 2 tokens
PARITY_CASES = ((1, 8, 0, 1), (3, 13, 0, 4), (1, 8, 5, 1), (3, 13, 4, 2), (2, 20, 9, 1))


def parity(encoder: Encoder, decoder: Decoder, sessions: dict[str, object]) -> dict[str, float]:
    """Max |Δ| of ORT vs PyTorch: the encoder over non-pad positions, the decoders over logits and presents
    (encoder keys at pad positions included: they are projections, not attention outputs)."""
    from weightsmith.export.to_onnx.validate import max_abs, ort_run, torch_run

    result, shape = {}, decoder.shape
    cached = Decoder(decoder.model, shape, with_past=True).eval()
    for batch, seq, past, new in PARITY_CASES:
        enc = encoder_feeds(shape, batch, seq, seed=1)
        if past == 0:
            mask = enc.get("attention_mask", torch.ones(batch, 1, dtype=torch.long))
            got = torch.from_numpy(ort_run(sessions[ENCODER], enc))
            length = shape.features[1] if shape.speech else seq  # speech: the model's frames
            result[f"encoder {batch}x{length}"] = max_abs(got, torch_run(encoder, enc)[0], mask)
        feeds = decoder_feeds(encoder, decoder, enc, past, new, seed=1)
        module, name = (cached, DECODER_WITH_PAST) if past else (decoder, DECODER)
        with torch.no_grad():
            expected = module(*feeds.values())
        got_all = sessions[name].run(None, {n: t.numpy() for n, t in feeds.items()})  # type: ignore[attr-defined]
        worst = 0.0
        for g, e in zip(got_all, expected):
            same = tuple(g.shape) == tuple(e.shape)
            worst = max(worst, (torch.from_numpy(g) - e).abs().max().item() if same else float("inf"))
        result[f"decoder {batch}x{seq}:{past}+{new}"] = worst
    return result
