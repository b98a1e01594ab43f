"""Helpers for the distillation tests: a character-level tokenizer for the tiny conftest models, offline English text.

The tiny models have a 128-token vocabulary and no tokenizer; a character tokenizer over printable ASCII (95
symbols plus 6 specials) fits in it. Text comes from docstrings, generated at run time: ``english_lines`` from a
fixed list of imported standard-library modules, ``docstring_lines`` from every source file under some directories
(parsed, not imported).
"""

from __future__ import annotations

import ast
import importlib
import shutil
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
_MODULES = [
    "argparse",
    "json",
    "pathlib",
    "collections",
    "functools",
    "itertools",
    "subprocess",
    "logging",
    "unittest",
    "decimal",
    "fractions",
    "statistics",
    "textwrap",
    "string",
    "re",
    "shutil",
    "tarfile",
    "zipfile",
    "csv",
    "datetime",
    "calendar",
    "email",
    "http.client",
    "urllib.request",
    "threading",
    "asyncio",
    "inspect",
    "typing",
    "dataclasses",
    "enum",
    "heapq",
    "bisect",
    "random",
    "difflib",
]


def _prose(docs: Iterable[str | None], lines: dict[str, None]) -> None:
    """Add the prose lines (≥ 40 ASCII characters, no doctest prompts) of ``docs`` to the ordered set ``lines``."""
    for doc in docs:
        if not isinstance(doc, str):
            continue
        for line in doc.splitlines():
            line = " ".join(line.split())
            if len(line) >= 40 and line.isascii() and not line.startswith((">>>", "...")):
                lines[line] = None


def lines_by_module() -> dict[str, list[str]]:
    """The prose lines of each module of the fixed list: its docstring and its public attributes' docstrings."""
    modules = [importlib.import_module(name) for name in _MODULES]  # first all: imports add package attributes
    out = {}
    for name, module in zip(_MODULES, modules):
        lines: dict[str, None] = {}
        _prose(
            [module.__doc__]
            + [getattr(getattr(module, a), "__doc__", None) for a in sorted(dir(module)) if not a.startswith("_")],
            lines,
        )
        out[name] = list(lines)
    return out


def english_lines() -> list[str]:
    """Prose lines (≥ 40 ASCII characters) from standard-library docstrings, in a fixed order."""
    return list(dict.fromkeys(line for lines in lines_by_module().values() for line in lines))


def docstring_lines(root: Path, *, skip: Iterable[str] = (), skip_dirs: Iterable[str] = ()) -> list[str]:
    """Prose lines of the module, class and function docstrings of every ``.py`` file under ``root`` (sorted paths),
    parsed with ``ast``; files named in ``skip`` (module names, e.g. "difflib") and directories named in ``skip_dirs``
    or "test"/"tests" are left out."""
    skip, skip_dirs = set(skip), {"test", "tests", *skip_dirs}
    lines: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        if path.stem in skip or skip_dirs & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        _prose(
            [
                ast.get_docstring(node, clean=False)
                for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            ],
            lines,
        )
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
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        **({"eos_token": "</s>"} if causal else {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}),
    )
    return fast


def with_tokenizer(model_dir: Path, dest: Path, *, causal: bool) -> Path:
    """A copy of a tiny model directory with a character tokenizer saved beside its weights."""
    shutil.copytree(model_dir, dest)
    char_tokenizer(causal).save_pretrained(dest)
    return dest


def tiny_vit(dest: Path, *, layers: int = 4, seed: int = 0, image_size: int = 16) -> Path:
    """A random ViT image classifier (3 classes named a, b, c) with its preprocessor_config.json."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    tf.ViTForImageClassification(config).eval().save_pretrained(dest)
    write_preprocessor(dest, image_size)
    return dest


def write_preprocessor(dest: Path, size: int) -> None:
    """preprocessor_config.json as ViTImageProcessor saves it (built by hand: the processor class needs PIL)."""
    import json

    config = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def image_folder(dest: Path, per_class: int = 6, *, seed: int = 0, size: int = 16) -> Path:
    """class_name/*.png for classes a, b, c: each class a brighter band in its own third of a noisy image, so a
    classifier can tell them apart."""
    import numpy as np

    from weightsmith.hf import write_png

    rng = np.random.default_rng(seed)
    for index, name in enumerate("abc"):
        (dest / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 100, (size, size, 3))
            band = slice(index * size // 3, (index + 1) * size // 3)
            image[band, :, index] += 150
            write_png(dest / name / f"{i:03d}.png", image.astype(np.uint8))
    return dest


def tiny_t5(dest: Path, *, layers: int = 4, seed: int = 0) -> Path:
    """A random T5 with the character tokenizer (pad 0, EOS '</s>' = 5)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=layers,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=SPECIALS.index("</s>"),
    )
    tf.T5ForConditionalGeneration(config).eval().save_pretrained(dest)
    char_tokenizer(causal=True).save_pretrained(dest)
    return dest
