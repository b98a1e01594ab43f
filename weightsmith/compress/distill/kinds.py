"""The kinds of model distillation knows, as rows: how a teacher's architecture is recognised, what its data files
hold and which held-out figure it reports. The training loop (``train``) dispatches on the row's name."""

from __future__ import annotations

from dataclasses import dataclass

from weightsmith.errors import CheckpointError


@dataclass(frozen=True)
class Kind:
    name: str
    endings: tuple[str, ...]  # architecture class-name endings that select this kind ("" matches any)
    data: str  # "text": .txt/.jsonl documents; "images": a class_name/*.png folder; "pairs": .jsonl text (+ target);
    # "audio": a .wav folder or a .jsonl naming the files (+ target transcripts)
    metric: str  # the held-out figure beside the loss
    loss: str  # in words, for the report and the docs
    reads: tuple[str, ...] = ()  # the model class's main_input_name this row takes (empty: any)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("causal", ("ForCausalLM", "LMHeadModel"), "text", "ce", "α·T²·KL + (1−α)·CE on the next token"),
        Kind("masked", ("ForMaskedLM",), "text", "ce", "α·T²·KL + (1−α)·CE on BERT-masked tokens"),
        Kind(
            "image",
            ("ForImageClassification",),
            "images",
            "agreement",
            "α·T²·KL + (1−α)·CE on the class logits + w·MSE of the final hidden states",
        ),
        Kind(
            "seq2seq",
            ("ForConditionalGeneration",),
            "pairs",
            "ce",
            "α·T²·KL + (1−α)·CE per target token + w·MSE of the final encoder and decoder hidden states",
            ("input_ids",),
        ),
        Kind(
            "speech",
            ("ForConditionalGeneration",),
            "audio",
            "ce",
            "α·T²·KL + (1−α)·CE per transcript token + w·MSE of the final encoder and decoder hidden states",
            ("input_features",),
        ),
        Kind("encoder", ("",), "text", "cosine", "MSE + (1 − cos) of per-token and pooled hidden states"),
    )
}


def kind_of(arch: str, where: object = "teacher", config: dict | None = None, reads: str = "input_ids") -> Kind:
    """The first row whose endings match ``arch`` and that takes what the model ``reads`` (its class's
    ``main_input_name``; the encoder row, last, matches any architecture); a ``…ForConditionalGeneration`` model is
    seq2seq (or speech, reading ``input_features``) only when its config says it is an encoder-decoder."""
    if not arch:
        raise CheckpointError(f"{where}: config.json names no architecture; distillation needs a model class")
    kind = next(k for k in KINDS.values() if arch.endswith(k.endings) and (not k.reads or reads in k.reads))
    if kind.name in ("seq2seq", "speech") and config is not None and not config.get("is_encoder_decoder"):
        raise CheckpointError(f"{where}: {arch} is not an encoder-decoder text model; distillation cannot train it")
    return kind
