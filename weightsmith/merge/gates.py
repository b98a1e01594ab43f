"""Router (gate) weights of a mixture-of-experts merge: pure functions on tensors, as mergekit-moe 0.1.5 makes them.

A Mixtral router scores a token's hidden state h against one row per expert, logits = W·h (W: (experts, hidden)).
mergekit-moe fills W from prompts (``cheap_embed``: the same row for every layer; ``hidden``: each layer's input
hidden states on the prompts) or at random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_EPS = 1e-8  # mergekit's clamp of every norm it divides by


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=_EPS)


def prompt_embedding(embed: Tensor, prompts: Sequence[Sequence[int]]) -> Tensor:
    """e = u / ‖u‖ with u = Σ_prompts Σ_tokens E[token]  — (hidden,), float32.

    ``embed`` is the (vocab, hidden) token embedding, ``prompts`` the token ids of each prompt (padding left out):
    mergekit-moe's ``get_cheap_embedding`` (a one-hot product summed over the sequence and the batch).
    """
    total = torch.zeros(embed.shape[1], dtype=torch.float32)
    for ids in prompts:
        if len(ids):
            total += embed[torch.as_tensor(list(ids), dtype=torch.long)].float().sum(dim=0)
    return _unit(total)


def cheap_embed_gate(embed: Tensor, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]]) -> Tensor:
    """g = v / ‖v‖ with v = e(positive) − e(negative) (v = e(positive) when there are no negative prompts)  — one
    expert's router row, (hidden,) float32; mergekit-moe's ``cheap_embed`` gate mode."""
    v = prompt_embedding(embed, positive)
    if negative:
        v = v - prompt_embedding(embed, negative)
    return _unit(v)


def hidden_gate(positive: Tensor, negative: Tensor | None) -> Tensor:
    """g = v / ‖v‖ per layer with v = h(positive) − h(negative) (v = h(positive) without negative prompts), h the
    prompts' hidden states entering each layer (``merge.hidden.prompt_states``)  — one expert's router rows,
    (layers, hidden), computed in the states' dtype (bfloat16, as mergekit-moe's ``hidden`` gate mode)."""
    v = positive - negative if negative is not None else positive
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=_EPS)


def random_gates(layers: int, experts: int, hidden: int, seed: int, uniform: bool = False) -> Tensor:
    """Every layer's router at once, (layers, experts, hidden) float32: N(0, 1) draws (mergekit-moe's ``random``),
    or U(−s, s) with s = 1/√hidden (``uniform_random``, torch.nn.Linear's initialisation). The draws are torch's
    CPU generator seeded with ``seed``: the same numbers mergekit-moe draws after ``torch.manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    if not uniform:
        return torch.randn((layers, experts, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=g) * 2 * scale - scale
