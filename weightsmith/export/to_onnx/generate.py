"""Greedy decoding driven through onnxruntime with the KV cache of a ``decoder.export`` graph.

The loop ``generate(do_sample=False)`` runs, with the graph in the model's place: feed the prompt with an empty
past, take the argmax of the last position, feed that one token with the returned ``present`` tensors as the next
``past_key_values``, and so on. Rows that have emitted ``eos_token_id`` continue with ``pad_token_id``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _past_inputs(session) -> list[tuple[str, int, int]]:
    """(name, kv_heads, head_dim) of each ``past_key_values.*`` input, in the graph's order."""
    return [(i.name, i.shape[1], i.shape[3]) for i in session.get_inputs() if i.name.startswith("past_key_values.")]


def greedy(
    session,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """(batch, prompt) int64 ids, left-padded where ``attention_mask`` has zeros → (batch, prompt + new) ids, as
    ``generate(do_sample=False, max_new_tokens=…)`` returns them (shorter when every row has ended).

    >>> greedy(ort.InferenceSession("llama-onnx/model.onnx"), ids, max_new_tokens=16)  # doctest: +SKIP
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(stops) if stops else 0)
    names = {i.name for i in session.get_inputs()}
    past = {name: np.zeros((ids.shape[0], heads, 0, dim), np.float32) for name, heads, dim in _past_inputs(session)}
    out, step, done = ids, ids, np.zeros(ids.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        feeds = {"input_ids": step, "attention_mask": mask, **past}
        if "position_ids" in names:
            pos = np.where(mask == 0, 1, mask.cumsum(-1) - 1)  # left padding at position 1, as transformers does
            feeds["position_ids"] = pos[:, -step.shape[1] :]
        logits, *present = session.run(None, feeds)
        token = logits[:, -1].argmax(-1).astype(np.int64)  # (batch,)
        token = np.where(done, pad, token)
        out = np.concatenate([out, token[:, None]], axis=1)
        done |= np.isin(token, list(stops))
        if done.all():
            break
        past = dict(zip(past, present))
        step, mask = token[:, None], np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    return out


def greedy_seq2seq(
    encoder,
    decoder,
    decoder_with_past,
    inputs: dict[str, np.ndarray],
    decoder_input_ids: np.ndarray,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Greedy decoding with the three graphs of an encoder-decoder export (``seq2seq.GRAPHS``): the encoder once
    on ``inputs`` (``input_ids`` and ``attention_mask``, right-padded; or Whisper's ``input_features``), the first
    decoder step on the prompt ``decoder_input_ids`` (batch, n) — usually the decoder start token — then one token
    per cached step. Returns (batch, n + new) decoder ids, as ``generate(do_sample=False)`` returns them for an
    encoder-decoder (shorter when every row has ended; ended rows continue with ``pad_token_id``).

    >>> greedy_seq2seq(enc, dec, dec_past, {"input_ids": ids, "attention_mask": mask}, np.array([[0]] * len(ids)),
    ...                max_new_tokens=32, eos_token_id=1)  # doctest: +SKIP
    """
    feeds = {n: np.asarray(v, dtype=np.float32 if n == "input_features" else np.int64) for n, v in inputs.items()}
    (hidden,) = encoder.run(None, feeds)
    mask = {"encoder_attention_mask": feeds["attention_mask"]} if "attention_mask" in feeds else {}
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    pad = pad_token_id if pad_token_id is not None else (min(stops) if stops else 0)
    out = np.asarray(decoder_input_ids, dtype=np.int64)
    done = np.zeros(out.shape[0], dtype=bool)
    past_names = [i.name for i in decoder_with_past.get_inputs() if i.name.startswith("past_key_values.")]
    logits, *present = decoder.run(None, {"input_ids": out, **mask, "encoder_hidden_states": hidden})
    past = dict(zip(past_names, present))  # the first step returns decoder and encoder entries, in past order
    for step in range(max_new_tokens):
        token = np.where(done, pad, logits[:, -1].argmax(-1).astype(np.int64))  # (batch,)
        out = np.concatenate([out, token[:, None]], axis=1)
        done |= np.isin(token, list(stops))
        if done.all() or step == max_new_tokens - 1:
            break
        logits, *own = decoder_with_past.run(None, {"input_ids": token[:, None], **mask, **past})
        past.update((n, t) for n, t in zip((n for n in past_names if ".decoder." in n), own))
    return out
