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
