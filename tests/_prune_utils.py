"""Helpers for the pruning tests: a tokenizer for the tiny models, calibration text, masked-original references."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Calibration text, deliberately different from conftest.SENTENCES (which are held out for evaluation).
CALIBRATION = [
    "The committee approved the budget after a long debate about schools and roads.",
    "Bright stars filled the night sky above the quiet desert camp.",
    "Engineers tested the bridge with heavy trucks before it opened to traffic.",
    "A small bakery on the corner sells fresh bread every morning.",
    "The river flooded the valley after three days of heavy rain.",
    "Doctors recommend regular exercise and a balanced diet for good health.",
    "The spacecraft sent back detailed images of the distant planet.",
    "Students gathered in the hall to hear the visiting professor speak.",
    "Farmers harvested the wheat early because a storm was coming.",
    "The new phone has a larger screen and a longer battery life.",
    "Historians discovered letters that changed the story of the war.",
    "The team celebrated their victory with a parade through the city.",
    "Fresh snow covered the mountains and the ski resorts opened early.",
    "The company announced plans to hire two hundred new workers.",
    "She painted the walls of her kitchen a pale shade of green.",
    "Scientists measured the temperature of the ocean at many depths.",
]


def with_tokenizer(model_dir: Path, dest: Path, vocab_size: int = 128) -> Path:
    """A copy of ``model_dir`` with a small BPE tokenizer (trained on the calibration text) that fits its vocab."""
    from conftest import SENTENCES
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if dest.exists():
        return dest
    shutil.copytree(model_dir, dest)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]"])
    tok.train_from_iterator(CALIBRATION + SENTENCES, trainer)
    assert tok.get_vocab_size() <= vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(dest)
    return dest


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def head_columns(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def mask_units_(model, kind: str, kept: dict[str, str], names: dict[str, str], units: int, head_dim: int) -> None:
    """Zero, in place, the output projection columns of the units a structured prune removed (the reference)."""
    from weightsmith.compress.prune.structured import parse_ranges

    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            keep = set(parse_ranges(kept[f"layer {i}"]))
            gone = [u for u in range(units) if u not in keep]
            weight = model.get_parameter(names[kind].format(i=i))
            cols = gone if kind == "ffn" else head_columns(gone, head_dim)
            weight[:, cols] = 0
