"""Quality of an encoder-decoder (T5, BART, …) against a reference model's own outputs: the reference writes its
greedy output for each source, the model reads it teacher-forced, and we count how often the model's top token is
the reference's (agreement) and the cross-entropy of the reference's tokens under the model.

Without ``ref`` the targets come from the data (``.jsonl`` lines with ``text`` and ``target``). The scoring loop
(``score``, ``summarise``) is shared with speech recognition (``evaluation.speech``), whose encoder reads audio
features instead of token ids.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith import hf
from weightsmith.errors import CheckpointError, ConfigError


@dataclass
class Sums:
    """Running sums over the scored target tokens of every example."""

    tokens: int = 0
    agree: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    max_abs: float = 0.0


@dataclass(frozen=True)
class Example:
    """One example: the encoder's inputs (``input_ids`` or ``input_features``, batch of 1), the decoder prompt the
    target follows (the decoder start token, and for Whisper its language/task tokens) and the target ids."""

    inputs: dict[str, Any]
    prompt: list[int]
    target: list[int]


def _targets(records: list[dict], sources: list[str], reference, tokenizer, data, max_length: int) -> list[list[int]]:
    """The reference's greedy outputs, or the data's ``target`` fields when there is no reference."""
    if reference is not None:
        return hf.greedy_outputs(reference, tokenizer, sources, max_length=max_length)
    if not all(isinstance(r.get("target"), str) for r in records):
        raise ConfigError(f"{data}: no `ref` and not every line has a 'target': nothing to compare the outputs with")
    return [tokenizer(text_target=r["target"], truncation=True, max_length=max_length)["input_ids"] for r in records]


def _target_logits(model, example: Example):
    """(len(target), vocab) float32 logits of the positions that predict the target, read teacher-forced: the
    decoder reads prompt + target[:-1], and the position of prompt[-1] predicts target[0]."""
    import torch

    decoder = torch.tensor([example.prompt + example.target[:-1]])
    logits = model(**example.inputs, decoder_input_ids=decoder).logits[0].float()  # (P + T − 1, vocab)
    return logits[len(example.prompt) - 1 :]


def _argmax(logits, suppress: list[int], begin_suppress: list[int]):
    """The top token at each position among those greedy decoding may write: the generation config's
    ``suppress_tokens`` are never written and its ``begin_suppress_tokens`` not as the first token."""
    if not suppress and not begin_suppress:
        return logits.argmax(-1)
    masked = logits.clone()
    masked[:, suppress] = float("-inf")
    masked[0, begin_suppress] = float("-inf")
    return masked.argmax(-1)


def score(model, reference, examples: Iterable[Example]) -> Sums:
    """agreement = Σ [greedy choice of p_model(·|x, y<t) = y_t], ce = Σ −log p_model(y_t|x, y<t) over the target
    tokens y of every example; with ``reference`` also Σ KL(p_ref ‖ p_model), the reference's ce and max |Δ| of the
    logits. One example at a time, unpadded."""
    import torch
    import torch.nn.functional as F

    config = model.generation_config
    suppress = list(getattr(config, "suppress_tokens", None) or [])
    begin_suppress = list(getattr(config, "begin_suppress_tokens", None) or [])
    sums = Sums()
    with torch.no_grad():
        for example in examples:
            if not example.target:
                continue
            labels = torch.tensor(example.target)
            out = _target_logits(model, example)  # (T, vocab)
            sums.tokens += len(example.target)
            sums.agree += int((_argmax(out, suppress, begin_suppress) == labels).sum())
            sums.nll += float(F.cross_entropy(out, labels, reduction="sum"))
            if reference is not None:
                other = _target_logits(reference, example)
                log_p, log_q = other.log_softmax(-1), out.log_softmax(-1)
                sums.kl += float((log_p.exp() * (log_p - log_q)).sum())
                sums.ref_nll += float(F.cross_entropy(other, labels, reduction="sum"))
                sums.max_abs = max(sums.max_abs, float((out - other).abs().max()))
    return sums


def summarise(report, sums: Sums, data, ref) -> None:
    """The summary's agreement, ce and perplexity per target token (and with ``ref`` the KL, ref ce and max |Δ|)."""
    if sums.tokens == 0:
        raise ConfigError(f"{data}: no target tokens to score")
    report.summary.update(
        target_tokens=sums.tokens,
        targets="reference outputs" if ref is not None else "data",
        agreement=sums.agree / sums.tokens,
        ce=sums.nll / sums.tokens,
        perplexity=math.exp(sums.nll / sums.tokens),
    )
    if ref is not None:
        report.summary.update(
            ref=str(ref), ref_ce=sums.ref_nll / sums.tokens, kl_per_token=sums.kl / sums.tokens, max_abs=sums.max_abs
        )


def evaluate_seq2seq(path: Path, data: str | os.PathLike, ref: str | os.PathLike | None, max_length: int):
    """agreement = mean over target tokens of [argmax p_model(·|x, y<t) = y_t], ce = mean −log p_model(y_t|x, y<t),
    where y is the reference's greedy output (or the data's target); with ``ref`` also KL(p_ref ‖ p_model) per token,
    the reference's own ce and max |Δ| of the logits. One example at a time, unpadded."""
    import torch

    from weightsmith.report import Report

    if path.suffix == ".onnx":
        raise ConfigError(f"{path}: seq2seq evaluation runs on checkpoint directories, not ONNX files")
    records = hf.read_records(data, what="evaluation data")
    tok_dir = path if hf.has_tokenizer(path) or ref is None else Path(ref)
    tokenizer = hf.load_tokenizer(tok_dir)
    model = hf.load_model(path)
    reference = hf.load_model(ref) if ref is not None else None
    if not model.config.is_encoder_decoder:
        raise CheckpointError(f"{path}: not an encoder-decoder model")
    if model.main_input_name != "input_ids":  # speech models go through evaluation.speech
        raise ConfigError(f"{path}: the model reads {model.main_input_name}, not text; only text-to-text is evaluated")
    sources = [r["text"] for r in records]
    start = [model.config.decoder_start_token_id]  # what transformers' labels= shift puts first
    report = Report("eval")
    with report.timed("run"), torch.no_grad():
        targets = _targets(records, sources, reference, tokenizer, data, max_length)
        encode = {"truncation": True, "max_length": max_length, "return_tensors": "pt"}
        examples = (
            Example({"input_ids": tokenizer(s, **encode)["input_ids"]}, start, t)
            for s, t in zip(sources, targets, strict=True)
        )
        sums = score(model, reference, examples)
    report.summary.update(model=str(path), kind="seq2seq", runtime="transformers", texts=len(sources))
    summarise(report, sums, data, ref)
    return report
