"""Where a tensor sits, read from its name alone: its transformer block and module (for the heat maps' grid)
and its kind of module (attention, MLP, norm, embeddings, heads) for the totals by type."""

from __future__ import annotations

from weightsmith.architecture import split_layer

# checked in order: a norm inside an attention block is a norm; BERT's "attention.output.dense" is attention,
# its "output.dense" (after the intermediate layer) is the MLP
_TYPES = (
    ("norm", ("norm", "ln_", ".ln", "layernorm")),
    ("embeddings", ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")),
    ("heads", ("lm_head", "score", "classifier", "qa_outputs", "pooler", "cls.")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")),
    ("MLP", ("mlp", "ffn", "intermediate", "output.dense", "fc", "gate_proj", "up_proj", "down_proj", "experts")),
)


def layer_and_module(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj.weight`` → (3, ``self_attn.q_proj``); a bias keeps its suffix, a tensor
    outside the blocks gives (None, its name without ``.weight``)."""
    name = name.removeprefix("base_model.model.")
    split = split_layer(name)
    if split is None:
        return None, name.removesuffix(".weight")
    return split[1], split[2].removesuffix(".weight")


def module_type(name: str) -> str:
    """attention, MLP, norm, embeddings, heads or other."""
    lower = name.lower()
    inside = split_layer(lower)
    tail = inside[2] if inside else lower
    for kind, keys in _TYPES:
        if any(k in tail for k in keys):
            return kind
    return "other"
