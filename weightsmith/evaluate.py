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
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                 "tokenizer.model")):
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


def perplexity(model_dir: str | os.PathLike, texts: list[str], *, max_length: int = 256, model=None,
               tokenizer=None) -> float:
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


def embeddings(model_dir: str | os.PathLike, texts: list[str], *, max_length: int = 128, model=None,
               tokenizer=None):
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


def embedding_cosine(model_dir: str | os.PathLike, ref_dir: str | os.PathLike, texts: list[str], *,
                     max_length: int = 128) -> float:
    """Mean over texts of cos(e_model(text), e_ref(text)) with mean-pooled embeddings (1.0 = identical).

    Both models read the texts through the reference's tokenizer, so a tokenizer-less output can be compared too.
    """
    tokenizer = load_tokenizer(ref_dir)
    a = embeddings(model_dir, texts, max_length=max_length, tokenizer=tokenizer)
    b = embeddings(ref_dir, texts, max_length=max_length, tokenizer=tokenizer)
    return float((a * b).sum(-1).mean())
