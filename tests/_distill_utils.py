"""Helpers for the distillation tests: a character-level tokenizer for the tiny conftest models, offline English text.

The tiny models have a 128-token vocabulary and no tokenizer; a character tokenizer over printable ASCII (95
symbols plus 6 specials) fits in it. Text comes from the docstrings of the standard library, generated at run time.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
_MODULES = ["argparse", "json", "pathlib", "collections", "functools", "itertools", "subprocess", "logging",
            "unittest", "decimal", "fractions", "statistics", "textwrap", "string", "re", "shutil", "tarfile",
            "zipfile", "csv", "datetime", "calendar", "email", "http.client", "urllib.request", "threading",
            "asyncio", "inspect", "typing", "dataclasses", "enum", "heapq", "bisect", "random", "difflib"]


def english_lines() -> list[str]:
    """Prose lines (≥ 40 ASCII characters) from standard-library docstrings, in a fixed order."""
    lines: dict[str, None] = {}  # ordered and de-duplicated
    for name in _MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [getattr(getattr(module, a), "__doc__", None) for a in sorted(dir(module))
                                   if not a.startswith("_")]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for line in doc.splitlines():
                line = " ".join(line.split())
                if len(line) >= 40 and line.isascii() and not line.startswith((">>>", "...")):
                    lines[line] = None
    return list(lines)


def write_corpus(path: Path, lines: list[str], *, jsonl: bool = False) -> Path:
    import json

    text = "\n".join(json.dumps({"text": s}) if jsonl else s for s in lines) + "\n"
    path.write_text(text)
    return path


def char_tokenizer(causal: bool):
    """A PreTrainedTokenizerFast: one token per printable ASCII character, BERT-style specials for encoders."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if not causal:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   **({"eos_token": "</s>"} if causal else
                                      {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}))
    return fast


def with_tokenizer(model_dir: Path, dest: Path, *, causal: bool) -> Path:
    """A copy of a tiny model directory with a character tokenizer saved beside its weights."""
    shutil.copytree(model_dir, dest)
    char_tokenizer(causal).save_pretrained(dest)
    return dest
