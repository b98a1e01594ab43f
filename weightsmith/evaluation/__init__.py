"""The eval verb: quality of a checkpoint or an ONNX file, alone or against a reference model.

The measures live in ``text`` (perplexity, KL, embedding cosine). Model loading, tokenizers, onnxruntime sessions
and data readers live in ``weightsmith.hf``; the names below are re-exported for callers of the helpers that used
to live here.

>>> ws.evaluate("pruned/", "held_out.txt", ref="dense/").summary  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from weightsmith.errors import CheckpointError
from weightsmith.evaluation.text import embedding_cosine, embeddings, perplexity
from weightsmith.hf import encode, is_causal_lm, load_model, load_tokenizer, read_texts, require_tokenizer

__all__ = [
    "embedding_cosine",
    "embeddings",
    "encode",
    "evaluate",
    "is_causal_lm",
    "load_model",
    "load_tokenizer",
    "perplexity",
    "read_texts",
    "require_tokenizer",
]


def evaluate(
    model: str | os.PathLike, data: str | os.PathLike, *, ref: str | os.PathLike | None = None, max_length: int = 128
):
    """Quality of a checkpoint directory or an ONNX file on ``data``, alone or against a reference checkpoint.

    Text (one sample per line): causal LMs report perplexity (and with ``ref`` the reference's perplexity, max |Δ|
    of the logits and KL(p_ref ‖ p_model) per token); encoders need ``ref`` and report the mean cosine of mean-pooled
    embeddings (``evaluation.text``).

    >>> ws.evaluate("pruned/", "held_out.txt", ref="dense/").summary  # doctest: +SKIP
    """
    path = Path(model)
    for p in (path, *([Path(ref)] if ref is not None else [])):
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
    from weightsmith.evaluation.text import evaluate_text

    return evaluate_text(path, data, ref, max_length)
