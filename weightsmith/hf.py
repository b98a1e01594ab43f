"""The one place that builds transformers models, tokenizers and onnxruntime sessions, and reads the data files the
model-building verbs (eval, distill, calibrated prune) take.

transformers, torch and onnxruntime are imported inside the functions: importing this module stays torch-free.

>>> texts = read_texts("held_out.txt")                                   # doctest: +SKIP
>>> model = load_model("pruned-llama")                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")


# -- text ---------------------------------------------------------------------------------------------------------


def read_texts(path: str | os.PathLike, *, what: str = "text file") -> list[str]:
    """Documents of a UTF-8 file: the ``text`` field of each line of a ``.jsonl`` file, else each non-empty line.

    Refuses a missing or empty file, or a bad JSON line, with one line naming the file (and the line).
    """
    return [record["text"] for record in read_records(path, what=what)]


def read_records(path: str | os.PathLike, *, what: str = "text file", fields: tuple[str, ...] = ()) -> list[dict]:
    """Records of a data file: ``{"text": line}`` per non-empty line of a text file, or the JSON objects of a
    ``.jsonl`` file, each with a string ``text`` field (and a string value for each of ``fields``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read {what} as UTF-8 text ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            records.append({"text": line.strip()})
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{p}: line {number} is not valid JSON") from None
        for key in ("text", *fields):
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ConfigError(f"{p}: line {number} has no string field {key!r}")
        if record["text"].strip():
            records.append(record)
    if not records:
        raise ConfigError(f"{p}: {what} is empty")
    return records


# -- models -------------------------------------------------------------------------------------------------------


def architecture(config: dict | None) -> str:
    """The checkpoint's ``architectures[0]`` ("" when config.json names none)."""
    return ((config or {}).get("architectures") or [""])[0] or ""


def is_causal_lm(config: dict | None) -> bool:
    """True when the checkpoint's architecture is a language-model head that predicts the next token."""
    archs = " ".join((config or {}).get("architectures") or [])
    return "CausalLM" in archs or "LMHeadModel" in archs


def read_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a model directory; refuses a directory without one."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no config.json: cannot tell what kind of model this is")
    return json.loads(path.read_text())


def model_class(config: dict | None, where: str | os.PathLike):
    """The transformers class named by ``architectures[0]``; refuses a config without one or an unknown name."""
    import transformers

    arch = architecture(config)
    if not arch:
        raise CheckpointError(f"{where}: config.json names no architecture; this needs a model class")
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise CheckpointError(f"{where}: architecture {arch!r} is not in this transformers version")
    return cls


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


def ort_session(path: str | os.PathLike, *, threads: int = 1):
    """An onnxruntime CPU session for an ONNX file (``threads`` intra-op threads: 1 keeps runs comparable)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- tokenizers ---------------------------------------------------------------------------------------------------


def has_tokenizer(model_dir: str | os.PathLike) -> bool:
    path = Path(model_dir)
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def require_tokenizer(model_dir: str | os.PathLike) -> None:
    """Refuse, with one line and without importing anything, a directory without tokenizer files."""
    if not has_tokenizer(model_dir):
        raise CheckpointError(
            f"{Path(model_dir)}: no tokenizer files (tokenizer.json, vocab.txt…): text cannot be encoded"
        )


def load_tokenizer(model_dir: str | os.PathLike, *, pad_with_eos: bool = False, need_mask: bool = False):
    """The tokenizer saved beside a checkpoint; refuses with one line when there is none or it cannot load.

    ``pad_with_eos``: a tokenizer without a pad token pads with EOS (causal LMs often ship without one; padded
    positions are masked out). ``need_mask``: refuse a tokenizer without a mask token (masked-LM training).
    """
    import transformers

    path = Path(model_dir)
    require_tokenizer(path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({str(exc).splitlines()[0][:160]})") from None
    if pad_with_eos and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if need_mask and tok.mask_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer has no mask token, which masked-LM distillation needs")
    return tok


def encode(tokenizer, texts: list[str], max_length: int) -> list[Any]:
    """One ``input_ids`` [1, T] tensor per text (special tokens included, truncated, never padded)."""
    out = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        if ids.shape[1] > 0:
            out.append(ids)
    return out
