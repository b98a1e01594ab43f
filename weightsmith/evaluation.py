"""Model-quality helpers shared by the verbs: load a transformers model from a checkpoint once, read text files,
measure perplexity (causal LMs) and embedding fidelity (encoders).

transformers is imported inside the functions: importing this module stays torch- and transformers-free.

>>> texts = read_texts("held_out.txt")                                   # doctest: +SKIP
>>> perplexity("pruned-llama", texts)                                    # doctest: +SKIP
>>> embedding_cosine("pruned-minilm", "all-MiniLM-L6-v2", texts)         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, ConfigError


def read_texts(path: str | os.PathLike, *, what: str = "text file") -> list[str]:
    """The non-empty lines of a UTF-8 text file; refuses a missing or empty file with one line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read {what} ({exc})") from None
    texts = [line for line in lines if line]
    if not texts:
        raise ConfigError(f"{p}: {what} is empty")
    return texts


def is_causal_lm(config: dict | None) -> bool:
    """True when the checkpoint's architecture is a language-model head that predicts the next token."""
    archs = " ".join((config or {}).get("architectures") or [])
    return "CausalLM" in archs or "LMHeadModel" in archs


def load_model(model_dir: str | os.PathLike, *, dtype: Any = "float32"):
    """The transformers model a checkpoint directory describes (its ``architectures[0]`` class), in eval mode.

    Loading by the exact class keeps parameter names equal to the checkpoint's tensor names.
    """
    import torch
    import transformers

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json: a transformers model directory is needed here")
    transformers.utils.logging.disable_progress_bar()  # weightsmith reports for itself; stderr stays quiet
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if is_causal_lm(config.to_dict()) else transformers.AutoModel
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return cls.from_pretrained(path, dtype=dtype).eval()


def require_tokenizer(model_dir: str | os.PathLike) -> None:
    """Refuse, with one line and without importing anything, a directory without tokenizer files."""
    path = Path(model_dir)
    if not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    ):
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json, vocab.txt…): text cannot be encoded")


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved beside a checkpoint; refuses with one line when there is none."""
    import transformers

    path = Path(model_dir)
    require_tokenizer(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def encode(tokenizer, texts: list[str], max_length: int) -> list[Any]:
    """One ``input_ids`` [1, T] tensor per text (special tokens included, truncated, never padded)."""
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] > 0:
            out.append(ids)
    return out


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
        import json

        self.path = path
        self.onnx = path.suffix == ".onnx"
        self.tokenizer_dir = path.parent if self.onnx else path
        config_file = self.tokenizer_dir / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.tokenizer_dir}: no config.json: cannot tell what kind of model this is")
        self.causal = is_causal_lm(json.loads(config_file.read_text()))
        self._model = None

    def _load(self):
        if self.onnx:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
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


def evaluate(
    model: str | os.PathLike, data: str | os.PathLike, *, ref: str | os.PathLike | None = None, max_length: int = 128
):
    """Quality of a checkpoint directory or an ONNX file on the texts of ``data`` (one per line), alone or against
    a reference checkpoint.

    Causal LMs: perplexity = exp(mean next-token NLL); with ``ref`` also the reference's perplexity, max |Δ| of the
    logits and the mean per-token KL(p_ref ‖ p_model). Encoders (need ``ref``): mean cosine of mean-pooled sentence
    embeddings and max |Δ| of the last hidden states. Texts run one at a time, unpadded, through the tokenizer
    beside the model (or the reference's).

    >>> ws.evaluate("pruned/", "held_out.txt", ref="dense/").summary  # doctest: +SKIP
    """
    import torch

    from weightsmith.report import Report, figures_requested

    path = Path(model)
    for p in (path, *([Path(ref)] if ref is not None else [])):
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
    texts = read_texts(data, what="evaluation data")
    runner = _Runner(path)
    reference = _Runner(Path(ref)) if ref is not None else None
    if reference is not None and reference.causal != runner.causal:
        raise ConfigError(f"{path}: cannot compare a causal LM with an encoder ({ref})")
    if reference is None and not runner.causal:
        raise ConfigError(f"{path}: an encoder has no perplexity; pass `ref`, a reference model, to compare embeddings")
    tok_dir = runner.tokenizer_dir
    try:
        require_tokenizer(tok_dir)
    except CheckpointError:
        if reference is None:
            raise
        tok_dir = reference.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir)
    report = Report("eval")
    per_text: list[dict] | None = [] if figures_requested() else None  # the HTML report's per-text bars
    nll = ref_nll = tokens = positions = 0.0
    max_abs, kl_sum = 0.0, 0.0
    cosines: list[float] = []
    with report.timed("run"):
        for ids in encode(tokenizer, texts, max_length):
            out = runner.outputs(ids)
            other = reference.outputs(ids) if reference is not None else None
            before = (nll, tokens, ref_nll, kl_sum, positions, len(cosines))
            if runner.causal and ids.shape[1] > 1:
                targets = ids[0, 1:]
                nll += float(torch.nn.functional.cross_entropy(out[:-1], targets, reduction="sum"))
                tokens += ids.shape[1] - 1
                if other is not None:
                    ref_nll += float(torch.nn.functional.cross_entropy(other[:-1], targets, reduction="sum"))
            if other is not None:
                max_abs = max(max_abs, float((out - other).abs().max()))
                if runner.causal:
                    log_p, log_q = other.log_softmax(-1), out.log_softmax(-1)
                    kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
                    positions += ids.shape[1]
                else:
                    a, b = out.mean(0), other.mean(0)
                    cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
            if per_text is not None:
                per_text.append(_text_figures(ids, before, (nll, tokens, ref_nll, kl_sum, positions), cosines))
    report.summary.update(
        model=str(path),
        kind="causal LM" if runner.causal else "encoder",
        runtime="onnxruntime" if runner.onnx else "transformers",
        texts=len(texts),
    )
    if runner.causal:
        if tokens == 0:
            raise ConfigError(f"{data}: the texts encode to fewer than two tokens each")
        report.summary["perplexity"] = math.exp(nll / tokens)
    if reference is not None:
        report.summary.update(ref=str(ref), max_abs=max_abs)
        if runner.causal:
            report.summary.update(ref_perplexity=math.exp(ref_nll / tokens), kl_per_token=kl_sum / positions)
        else:
            report.summary["embedding_cosine"] = sum(cosines) / len(cosines)
    if per_text is not None:
        report.figures["texts"] = per_text
    return report


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
