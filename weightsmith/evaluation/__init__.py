"""The eval verb: quality of a checkpoint or an ONNX file, alone or against a reference model.

The model's kind picks the measure: text (``text``: perplexity, KL, embedding cosine), image classification
(``images``: accuracy, agreement), seq2seq (``seq2seq``: token agreement and cross-entropy) or speech recognition
(``speech``: the same on transcripts of .wav files). Model loading, tokenizers, onnxruntime sessions and data
readers live in ``weightsmith.hf`` (audio in ``weightsmith.audio``); the names below are re-exported for callers of
the helpers that used to live here.

>>> ws.evaluate("pruned/", "held_out.txt", ref="dense/").summary  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from weightsmith import hf
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

    The model's kind picks the data and the figures:

    - text (one sample per line): causal LMs report perplexity (and with ``ref`` the reference's perplexity, max |Δ|
      of the logits and KL(p_ref ‖ p_model) per token); encoders need ``ref`` and report the mean cosine of
      mean-pooled embeddings (``evaluation.text``);
    - image classifiers (``data`` a class_name/*.png folder): accuracy, and with ``ref`` top-1 agreement, KL per
      image and max |Δ| (``evaluation.images``);
    - encoder-decoders (.txt/.jsonl sources): token agreement and cross-entropy against the reference's greedy
      outputs (or the data's ``target`` fields), KL per token (``evaluation.seq2seq``);
    - speech recognisers such as Whisper (``data`` a folder of .wav files, or a .jsonl naming them in ``audio``,
      optional ``target``): the same figures on the reference's greedy transcripts (``evaluation.speech``).

    >>> ws.evaluate("pruned/", "held_out.txt", ref="dense/").summary  # doctest: +SKIP
    """
    path = Path(model)
    for p in (path, *([Path(ref)] if ref is not None else [])):
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
    kind = model_kind(path.parent if path.suffix == ".onnx" else path)
    if kind == "image":
        from weightsmith.evaluation.images import evaluate_images

        return evaluate_images(path, data, ref)
    if kind == "speech":
        from weightsmith.evaluation.speech import evaluate_speech

        return evaluate_speech(path, data, ref, max_length)
    if kind == "seq2seq":
        from weightsmith.evaluation.seq2seq import evaluate_seq2seq

        return evaluate_seq2seq(path, data, ref, max_length)
    from weightsmith.evaluation.text import evaluate_text

    return evaluate_text(path, data, ref, max_length)


def model_kind(model_dir: Path) -> str:
    """ "image" (an image classifier), "speech" (an encoder-decoder reading ``input_features``: Whisper), "seq2seq"
    (another encoder-decoder) or "text", from config.json and the model class it names; a directory without one is
    text (the text path refuses it with its own message)."""
    try:
        config = hf.read_config(model_dir)
    except CheckpointError:
        return "text"
    if hf.architecture(config).endswith("ForImageClassification"):
        return "image"
    if not config.get("is_encoder_decoder"):
        return "text"
    reads = getattr(hf.model_class(config, model_dir), "main_input_name", "input_ids")
    return "speech" if reads == "input_features" else "seq2seq"
