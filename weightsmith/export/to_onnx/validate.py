"""Validate: onnxruntime against PyTorch on padded batches; inputs, sessions and the comparisons they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weightsmith import architecture

VALIDATION_BATCHES = (1, 8)
VALIDATION_SEQUENCES = (8, 128)  # clipped to the model's max_position_embeddings


def max_positions(config) -> int:
    return architecture.max_positions(config if isinstance(config, dict) else config.to_dict())


def validation_shapes(config, input_names: Sequence[str]) -> list[tuple[int, int]]:
    """(batch, sequence) pairs; for images (batch, image size)."""
    if "pixel_values" in input_names:
        return [(b, config.image_size) for b in VALIDATION_BATCHES]
    limit = max_positions(config)
    sequences = sorted({min(s, limit) for s in VALIDATION_SEQUENCES})
    return [(b, s) for b in VALIDATION_BATCHES for s in sequences]


def example_inputs(config, input_names: Sequence[str], batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; right padding with rows shortened down to half length (row 0 full) when batch > 1.
    Images: standard-normal pixel values (batch, channels, size, size), ``seq`` unused."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 1009 + seq)
    if "pixel_values" in input_names:
        size, channels = config.image_size, getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}
    feeds = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=gen)}
    lengths = [seq - (i * seq) // (2 * batch) for i in range(batch)]  # (batch,) from seq down to ~seq/2
    feeds["attention_mask"] = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {n: feeds[n] for n in input_names}


def torch_run(wrapper: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return wrapper(*feeds.values()).float()


def ort_run(sess, feeds: dict[str, torch.Tensor]):
    return sess.run(None, {n: t.numpy() for n, t in feeds.items()})[0]


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
    """Max |Δ| over non-pad positions of ORT vs PyTorch, per batch×sequence."""
    result = {}
    for (b, s), feeds in inputs.items():
        expected = torch_run(wrapper, feeds)
        got = torch.from_numpy(ort_run(sess, feeds))
        result[f"{b}x{s}"] = max_abs(got, expected, mask_of(feeds))
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
