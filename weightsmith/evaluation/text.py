"""Quality on text: perplexity (causal LMs), embedding fidelity (encoders), and the eval verb's text path.

transformers is imported inside the functions: importing this module stays torch- and transformers-free.

>>> texts = read_texts("held_out.txt")                                   # doctest: +SKIP
>>> perplexity("pruned-llama", texts)                                    # doctest: +SKIP
>>> embedding_cosine("pruned-minilm", "all-MiniLM-L6-v2", texts)         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.hf import (
    encode,
    is_causal_lm,
    load_model,
    load_tokenizer,
    ort_session,
    read_config,
    read_texts,
    require_tokenizer,
)


def perplexity(
    model_dir: str | os.PathLike, texts: list[str], *, max_length: int = 256, model=None, tokenizer=None
) -> float:
    """exp(mean next-token negative log-likelihood over every predicted token of every text).

    Texts are scored one at a time (no padding); a text of T tokens contributes T−1 predictions.
    """
    import torch

    model = model if model is not None else load_model(model_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in encode(tokenizer, texts, max_length):
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, vocab)
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + ids.shape[1] - 1
    if count == 0:
        raise ConfigError("perplexity: the texts encode to fewer than two tokens each")
    return math.exp(total / count)


def embeddings(model_dir: str | os.PathLike, texts: list[str], *, max_length: int = 128, model=None, tokenizer=None):
    """Mean-pooled, L2-normalised last hidden states, one row per text: [len(texts), hidden]."""
    import torch

    model = model if model is not None else load_model(model_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    rows = []
    with torch.no_grad():
        for ids in encode(tokenizer, texts, max_length):
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()
            rows.append(hidden.mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def embedding_cosine(
    model_dir: str | os.PathLike, ref_dir: str | os.PathLike, texts: list[str], *, max_length: int = 128
) -> float:
    """Mean over texts of cos(e_model(text), e_ref(text)) with mean-pooled embeddings (1.0 = identical).

    Both models read the texts through the reference's tokenizer, so a tokenizer-less output can be compared too.
    """
    tokenizer = load_tokenizer(ref_dir)
    a = embeddings(model_dir, texts, max_length=max_length, tokenizer=tokenizer)
    b = embeddings(ref_dir, texts, max_length=max_length, tokenizer=tokenizer)
    return float((a * b).sum(-1).mean())


# -- the eval verb ----------------------------------------------------------------------------------------------


class _Runner:
    """Runs one text at a time through a checkpoint (transformers) or an ONNX file (onnxruntime).

    ``outputs(ids)`` gives the model's main output for a [1, T] input: logits [T, vocab] for causal LMs, the last
    hidden state [T, hidden] otherwise. The model loads on first use, so that bad input is refused before any load.
    """

    def __init__(self, path: Path):
        self.path = path
        self.onnx = path.suffix == ".onnx"
        self.tokenizer_dir = path.parent if self.onnx else path
        self.causal = is_causal_lm(read_config(self.tokenizer_dir))
        self._model = None

    def _load(self):
        if self.onnx:
            session = ort_session(self.path)
            self.inputs = [i.name for i in session.get_inputs()]
            return session
        return load_model(self.path)

    def outputs(self, ids):
        import torch

        self._model = self._model if self._model is not None else self._load()
        mask = torch.ones_like(ids)
        if self.onnx:
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
            result = self._model.run(None, {k: feeds[k].numpy() for k in self.inputs if k in feeds})
            return torch.from_numpy(result[0])[0].float()
        with torch.no_grad():
            out = self._model(input_ids=ids, attention_mask=mask)
        return (out.logits if self.causal else out.last_hidden_state)[0].float()


@dataclass
class _Sums:
    """Running sums over the texts: next-token NLL (model, reference), predicted tokens, KL and positions."""

    nll: float = 0.0
    tokens: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    positions: float = 0.0
    max_abs: float = 0.0
    cosines: list[float] = field(default_factory=list)

    def totals(self) -> tuple:
        return (self.nll, self.tokens, self.ref_nll, self.kl, self.positions, len(self.cosines))

    def add(self, ids, out, other, causal: bool) -> None:
        """One text's [1, T] ids, the model's output and the reference's (or None)."""
        import torch

        if causal and ids.shape[1] > 1:
            targets = ids[0, 1:]
            self.nll += float(torch.nn.functional.cross_entropy(out[:-1], targets, reduction="sum"))
            self.tokens += ids.shape[1] - 1
            if other is not None:
                self.ref_nll += float(torch.nn.functional.cross_entropy(other[:-1], targets, reduction="sum"))
        if other is None:
            return
        self.max_abs = max(self.max_abs, float((out - other).abs().max()))
        if causal:
            log_p, log_q = other.log_softmax(-1), out.log_softmax(-1)
            self.kl += float((log_p.exp() * (log_p - log_q)).sum())
            self.positions += ids.shape[1]
        else:
            a, b = out.mean(0), other.mean(0)
            self.cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))


def evaluate_text(path: Path, data: str | os.PathLike, ref: str | os.PathLike | None, max_length: int):
    """Quality of a checkpoint directory or an ONNX file on the texts of ``data`` (one per line), alone or against
    a reference checkpoint.

    Causal LMs: perplexity = exp(mean next-token NLL); with ``ref`` also the reference's perplexity, max |Δ| of the
    logits and the mean per-token KL(p_ref ‖ p_model). Encoders (need ``ref``): mean cosine of mean-pooled sentence
    embeddings and max |Δ| of the last hidden states. Texts run one at a time, unpadded, through the tokenizer
    beside the model (or the reference's).
    """
    from weightsmith.report import Report, figures_requested

    texts = read_texts(data, what="evaluation data")
    runner = _Runner(path)
    reference = _Runner(Path(ref)) if ref is not None else None
    if reference is not None and reference.causal != runner.causal:
        raise ConfigError(f"{path}: cannot compare a causal LM with an encoder ({ref})")
    if reference is None and not runner.causal:
        raise ConfigError(f"{path}: an encoder has no perplexity; pass `ref`, a reference model, to compare embeddings")
    tokenizer = load_tokenizer(_tokenizer_dir(runner, reference))
    report = Report("eval")
    per_text: list[dict] | None = [] if figures_requested() else None  # the HTML report's per-text bars
    sums = _Sums()
    with report.timed("run"):
        for ids in encode(tokenizer, texts, max_length):
            before = sums.totals()
            sums.add(ids, runner.outputs(ids), reference.outputs(ids) if reference is not None else None, runner.causal)
            if per_text is not None:
                per_text.append(_text_figures(ids, before, sums.totals()[:5], sums.cosines))
    report.summary.update(
        model=str(path),
        kind="causal LM" if runner.causal else "encoder",
        runtime="onnxruntime" if runner.onnx else "transformers",
        texts=len(texts),
    )
    _summarise(report, sums, runner.causal, data, ref)
    if per_text is not None:
        report.figures["texts"] = per_text
    return report


def _tokenizer_dir(runner: _Runner, reference: _Runner | None) -> Path:
    """The model's own tokenizer, or the reference's when the model has none beside it."""
    try:
        require_tokenizer(runner.tokenizer_dir)
    except CheckpointError:
        if reference is None:
            raise
        return reference.tokenizer_dir
    return runner.tokenizer_dir


def _summarise(report, sums: _Sums, causal: bool, data, ref) -> None:
    if causal:
        if sums.tokens == 0:
            raise ConfigError(f"{data}: the texts encode to fewer than two tokens each")
        report.summary["perplexity"] = math.exp(sums.nll / sums.tokens)
    if ref is None:
        return
    report.summary.update(ref=str(ref), max_abs=sums.max_abs)
    if causal:
        report.summary.update(
            ref_perplexity=math.exp(sums.ref_nll / sums.tokens), kl_per_token=sums.kl / sums.positions
        )
    else:
        report.summary["embedding_cosine"] = sum(sums.cosines) / len(sums.cosines)


def _text_figures(ids, before: tuple, after: tuple, cosines: list[float]) -> dict:
    """One text's share of the run: its tokens, perplexity (and the reference's), KL per token, embedding cosine."""
    nll, tokens, ref_nll, kl_sum, positions = (a - b for a, b in zip(after, before))
    row: dict = {"tokens": int(ids.shape[1])}
    if tokens:
        row["perplexity"] = math.exp(nll / tokens)
        if ref_nll:
            row["ref_perplexity"] = math.exp(ref_nll / tokens)
    if positions:
        row["kl_per_token"] = kl_sum / positions
    if len(cosines) > before[5]:
        row["embedding_cosine"] = cosines[-1]
    return row
