"""Validate: onnxruntime against PyTorch on padded batches; inputs, sessions and the comparisons they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weightsmith import architecture
from weightsmith.errors import IncompatibleError

VALIDATION_BATCHES = (1, 8)
VALIDATION_SEQUENCES = (8, 128)  # clipped to the model's max_position_embeddings


def text_config(config):
    """The text tower's config of a dual encoder (CLIP, SigLIP: ``text_config``); the config itself otherwise."""
    return getattr(config, "text_config", None) or config


def image_config(config):
    """The vision tower's config of a dual encoder (``vision_config``); the config itself otherwise."""
    return getattr(config, "vision_config", None) or config


def max_positions(config) -> int:
    return architecture.max_positions(config if isinstance(config, dict) else text_config(config).to_dict())


def validation_shapes(config, input_names: Sequence[str]) -> list[tuple[int, int]]:
    """(batch, sequence) pairs; for images alone (batch, image size)."""
    if "input_ids" not in input_names:
        return [(b, image_config(config).image_size) for b in VALIDATION_BATCHES]
    limit = max_positions(config)
    sequences = sorted({min(s, limit) for s in VALIDATION_SEQUENCES})
    return [(b, s) for b in VALIDATION_BATCHES for s in sequences]


def example_inputs(
    config, input_names: Sequence[str], batch: int, seq: int, seed: int = 0, images: int | None = None
) -> dict[str, torch.Tensor]:
    """Random token ids; right padding with rows shortened down to half length (row 0 full) when batch > 1.
    Images: standard-normal pixel values (``images`` or ``batch``, channels, size, size); ``seq`` unused for a
    model of images alone."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 1009 + seq)
    feeds = {}
    if "pixel_values" in input_names:
        vision = image_config(config)
        size, channels = vision.image_size, getattr(vision, "num_channels", 3)
        feeds["pixel_values"] = torch.randn(images or batch, channels, size, size, generator=gen)
    if "input_ids" in input_names:
        feeds["input_ids"] = torch.randint(0, text_config(config).vocab_size, (batch, seq), generator=gen)
        lengths = [seq - (i * seq) // (2 * batch) for i in range(batch)]  # (batch,) from seq down to ~seq/2
        feeds["attention_mask"] = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
        feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {n: feeds[n] for n in input_names}


def torch_run(wrapper: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every output of the wrapper, as float32."""
    with torch.no_grad():
        out = wrapper(*feeds.values())
    return tuple(t.float() for t in (out if isinstance(out, tuple) else (out,)))


def ort_outputs(sess, feeds: dict[str, torch.Tensor]) -> list:
    """The graph's outputs for ``feeds``; refused in one line when onnxruntime rejects their shapes (a model whose
    code fixes a dimension while tracing exports a graph that takes only that size)."""
    try:
        return sess.run(None, {n: t.numpy() for n, t in feeds.items()})
    except Exception as exc:  # onnxruntime's own error types (InvalidArgument, Fail, …) come from its C++ module
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in feeds.items())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleError(f"the exported graph does not run on inputs of shape {shapes}: {first}") from None


def ort_run(sess, feeds: dict[str, torch.Tensor]):
    return ort_outputs(sess, feeds)[0]


def mask_of(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The attention mask; for inputs without one (images) a (batch, 1) mask: every output row is real."""
    if "attention_mask" in feeds:
        return feeds["attention_mask"]
    return torch.ones(next(iter(feeds.values())).shape[0], 1, dtype=torch.long)


def real_positions(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, …) outputs → the non-pad rows (n, features); pooled (batch, …) outputs → (batch, features)."""
    if output.dim() >= 3 and output.shape[:2] == mask.shape:
        return output[mask.bool()].reshape(int(mask.sum()), -1)
    return output.reshape(output.shape[0], -1)


def max_abs(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return (real_positions(got, mask) - real_positions(expected, mask)).abs().max().item()


def parity(wrapper: torch.nn.Module, sess, inputs: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict[str, float]:
    """Max |Δ| over non-pad positions of ORT vs PyTorch, per batch×sequence, over every output."""
    result = {}
    for (b, s), feeds in inputs.items():
        expected, got = torch_run(wrapper, feeds), ort_outputs(sess, feeds)
        worst = 0.0 if len(got) == len(expected) else float("inf")
        for g, e in zip(got, expected):
            worst = max(worst, max_abs(torch.from_numpy(g), e, mask_of(feeds)))
        result[f"{b}x{s}"] = worst
    return result


# Prompt lengths of the greedy check (the last two also as one left-padded batch), and the tokens generated
GREEDY_PROMPTS = (3, 8, 13)
GREEDY_TOKENS = 16


def greedy_prompts(vocab: int, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) pairs: each prompt alone, then two of them left-padded into one batch."""
    gen = torch.Generator().manual_seed(5)
    lengths = [min(n, limit) for n in GREEDY_PROMPTS]
    prompts = [torch.randint(3, vocab, (1, n), generator=gen) for n in lengths]
    single = [(p, torch.ones_like(p)) for p in prompts]
    a, b = prompts[-1], prompts[-2]  # (1, la), (1, lb) with lb < la: b gets la − lb pad tokens on the left
    pad = a.shape[1] - b.shape[1]
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)
    mask = torch.cat([torch.ones_like(a), torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(b)], 1)])
    return [*single, (torch.cat([a, padded]), mask)]


def greedy_agreement(model: Any, sess, vocab: int) -> dict[str, Any]:
    """Greedy decoding through onnxruntime with the cache (``generate.greedy``) against transformers'
    ``generate(do_sample=False)``, token for token: a summary line, and the first mismatch ("" if none)."""
    from weightsmith.export.to_onnx.generate import greedy

    limit = max_positions(model.config)
    new = max(1, min(GREEDY_TOKENS, limit - max(GREEDY_PROMPTS)))
    cfg = model.generation_config
    eos, pad = cfg.eos_token_id, cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    prompts = greedy_prompts(vocab, limit - new)
    for k, (ids, mask) in enumerate(prompts):
        with torch.no_grad():
            expected = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad
            )
        got = torch.from_numpy(
            greedy(sess, ids.numpy(), mask.numpy(), max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
        )
        if got.shape != expected.shape or not torch.equal(got, expected):
            at = next(
                (i for i in range(min(got.shape[1], expected.shape[1])) if not torch.equal(got[:, i], expected[:, i])),
                None,
            )
            return {"summary": "", "mismatch": f"differs from transformers' generate on prompt {k} at position {at}"}
    return {"summary": f"greedy = transformers generate on {len(prompts)} prompts × {new} tokens", "mismatch": ""}


def greedy_token_agreement(float_sess, int8_sess, vocab: int, limit: int) -> float:
    """Fraction of generated tokens on which greedy decoding with the int8 graph agrees with the float graph."""
    from weightsmith.export.to_onnx.generate import greedy

    new = max(1, min(GREEDY_TOKENS, limit - max(GREEDY_PROMPTS)))
    same = total = 0
    for ids, mask in greedy_prompts(vocab, limit - new):
        f, q = (greedy(s, ids.numpy(), mask.numpy(), max_new_tokens=new) for s in (float_sess, int8_sess))
        same += int((f[:, ids.shape[1] :] == q[:, ids.shape[1] :]).sum())
        total += f[:, ids.shape[1] :].size
    return round(same / total, 4)


def seq2seq_prompts(shape, limit: int) -> list[dict[str, torch.Tensor]]:
    """Encoder inputs of the seq2seq greedy check: each prompt alone, then the last two right-padded into one batch
    (speech: random features, one by one and three as a batch)."""
    from weightsmith.export.to_onnx.seq2seq import encoder_feeds

    if shape.speech:
        return [encoder_feeds(shape, 1, 0, seed=k) for k in range(3)] + [encoder_feeds(shape, 3, 0, seed=3)]
    gen = torch.Generator().manual_seed(5)
    lengths = [min(n, limit) for n in GREEDY_PROMPTS]
    prompts = [torch.randint(3, shape.vocab, (1, n), generator=gen) for n in lengths]
    single = [{"input_ids": p, "attention_mask": torch.ones_like(p)} for p in prompts]
    a, b = prompts[-1], prompts[-2]
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([b, torch.zeros(1, pad, dtype=torch.long)], 1)])
    mask = torch.cat([torch.ones_like(a), torch.cat([torch.ones_like(b), torch.zeros(1, pad, dtype=torch.long)], 1)])
    return [*single, {"input_ids": ids, "attention_mask": mask}]


def seq2seq_new_tokens(config) -> int:
    limit = getattr(config, "max_target_positions", None) or max_positions(config)
    return max(1, min(GREEDY_TOKENS, limit - 1))


def seq2seq_greedy_agreement(model: Any, shape, sessions: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding through onnxruntime (``generate.greedy_seq2seq``, three graphs) against transformers'
    ``GenerationMixin.generate(do_sample=False)`` from the decoder start token, token for token, with no stop token
    and no logits processor (forced EOS, suppressed tokens: rules of the caller's loop, not of the graphs), so that
    every row runs the whole length. A summary line, and the first mismatch ("" if none)."""
    from transformers import GenerationConfig, GenerationMixin

    from weightsmith.export.to_onnx.generate import greedy_seq2seq
    from weightsmith.export.to_onnx.seq2seq import DECODER, DECODER_WITH_PAST, ENCODER

    new, start = seq2seq_new_tokens(model.config), shape.start
    plain = GenerationConfig(decoder_start_token_id=start, pad_token_id=model.config.pad_token_id, do_sample=False)
    saved, model.generation_config = model.generation_config, plain  # generate fills unset fields from the model's
    prompts = seq2seq_prompts(shape, max_positions(model.config))
    try:
        for k, enc in enumerate(prompts):
            batch = next(iter(enc.values())).shape[0]
            start_ids = torch.full((batch, 1), start, dtype=torch.long)
            with torch.no_grad():
                expected = GenerationMixin.generate(
                    model, **enc, decoder_input_ids=start_ids, max_new_tokens=new, min_new_tokens=new
                )
            got = greedy_seq2seq(
                sessions[ENCODER],
                sessions[DECODER],
                sessions[DECODER_WITH_PAST],
                {n: t.numpy() for n, t in enc.items()},
                start_ids.numpy(),
                max_new_tokens=new,
            )
            if got.shape != tuple(expected.shape) or not (got == expected.numpy()).all():
                at = next(
                    (
                        i
                        for i in range(min(got.shape[1], expected.shape[1]))
                        if (got[:, i] != expected[:, i].numpy()).any()
                    ),
                    None,
                )
                return {"summary": "", "mismatch": f"differs from transformers' generate on input {k} at position {at}"}
    finally:
        model.generation_config = saved
    return {"summary": f"greedy = transformers generate on {len(prompts)} inputs × {new} tokens", "mismatch": ""}


def seq2seq_token_agreement(float_sessions: dict[str, Any], int8_sessions: dict[str, Any], shape, config) -> float:
    """Fraction of generated tokens on which greedy decoding with the int8 graphs agrees with the float graphs."""
    from weightsmith.export.to_onnx.generate import greedy_seq2seq
    from weightsmith.export.to_onnx.seq2seq import DECODER, DECODER_WITH_PAST, ENCODER

    new, same, total = seq2seq_new_tokens(config), 0, 0
    for enc in seq2seq_prompts(shape, max_positions(config)):
        feeds = {n: t.numpy() for n, t in enc.items()}
        start = torch.full((next(iter(enc.values())).shape[0], 1), shape.start).numpy()
        f, q = (
            greedy_seq2seq(s[ENCODER], s[DECODER], s[DECODER_WITH_PAST], feeds, start, max_new_tokens=new)
            for s in (float_sessions, int8_sessions)
        )
        same += int((f[:, 1:] == q[:, 1:]).sum())
        total += f[:, 1:].size
    return round(same / total, 4)
