"""The hidden states mergekit-moe's ``hidden`` routers are made from: the base model run on the experts' prompts one
decoder layer at a time (``weightsmith.layerwise``), so that only one layer's weights are in memory.

As mergekit-moe 0.1.5 does: the model runs in bfloat16; each expert's positive (and negative) prompts are one batch,
each prompt the BOS token's text followed by the prompt, no other special token, padded on the left with the BOS
token (the EOS token when there is none) under an attention mask; the state a layer's router row is made from is
that layer's input hidden state at the last position (``hidden``, ``hidden_last``) or averaged over every position,
padding included (``hidden_avg``), then averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from weightsmith.layerwise import capture, layer_output, load_layer, skeleton

HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
DTYPE = torch.bfloat16  # mergekit-moe loads the base in bfloat16 for these modes


def batch(tokenizer: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
    """One batch of prompts as mergekit-moe tokenizes it: input_ids and attention_mask [B, T], left-padded."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def prompt_states(ckpt: Any, batches: Sequence[Mapping[str, Tensor]], mode: str = "hidden") -> list[Tensor]:
    """For each batch, (layers, hidden) in bfloat16: row i is the mean over the batch of layer i's input hidden
    state, at the last position or averaged over the positions (``hidden_avg``). The layers run in order, each
    loaded from ``ckpt`` when its turn comes and dropped after."""
    device = torch.device("cpu")
    base, prefix, layers, _ = skeleton(ckpt, DTYPE)
    hidden, inputs = capture(base, layers, list(batches), device)
    del base  # the embedding: only the layers are needed from here
    rows: list[list[Tensor]] = [[] for _ in batches]
    for index, layer in enumerate(layers):
        for b, h in enumerate(hidden):  # h: (B, T, hidden)
            per_prompt = h.sum(dim=1) / h.shape[1] if mode == "hidden_avg" else h[:, -1, :]
            rows[b].append(per_prompt.sum(dim=0) / per_prompt.shape[0])
        if index == len(layers) - 1:
            break  # the last layer's output is no layer's input
        load_layer(layer, ckpt, f"{prefix}{index}.", device, DTYPE)
        with torch.no_grad():
            hidden = [layer_output(layer(h, *x["args"], **x["kwargs"])) for h, x in zip(hidden, inputs[index])]
        inputs[index] = []
        layers[index] = layer.to("meta")  # free the layer's weights
    return [torch.stack(r) for r in rows]
