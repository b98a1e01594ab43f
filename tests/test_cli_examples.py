"""Every example in the CLI's --help runs, as printed, in a folder holding tiny checkpoints under the names the
examples use, and exits 0.

The folder is built once: a tiny Llama with a byte-level BPE tokenizer (32 query heads over 8 KV heads, so the head
pruning example has heads to keep; widths of 128 and 256 for the group-size example), its fine-tunes and LoRA
adapters, GPT-2, BERT, T5, a tiny Whisper with .wav clips, a 6-layer BERT sentence encoder with a tokenizer under
MiniLM's names (the examples' training steps then take seconds), a mergekit config, a recipe and text files. An
example's output is removed before it runs, so examples that share an output name do not refuse each other.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from _architectures import build as build_arch
from _distill_utils import char_tokenizer, write_corpus
from _lora_utils import make_adapter
from _speech_utils import tiny_whisper, write_clips
from _tokenizers import byte_level_tokenizer
from conftest import SENTENCES, build_model

from weightsmith.cli import build_parser, main


def _examples() -> list[str]:
    """Each distinct example line of every (sub)command's --help epilog that runs weightsmith, in order."""
    lines: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        for line in (parser.epilog or "").split("examples:", 1)[-1].splitlines():
            if line.strip().startswith("weightsmith ") and line.strip() not in lines:
                lines.append(line.strip())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return lines


def _llama(seed: int = 0):
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=320,  # the byte-level BPE tokenizer's
        hidden_size=128,  # widths multiples of 128: the group-size example's group
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=8,
        intermediate_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config).eval()


def _encoder():
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.BertModel(config).eval()


def _save(model, path: Path, tokenizer=None, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _lora(base: Path, out: Path, seed: int) -> Path:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base)
    return make_adapter(model, out, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    import weightsmith as ws

    root = tmp_path_factory.mktemp("examples")
    tok = byte_level_tokenizer()  # a vocabulary llama.cpp takes, for the GGUF example
    tok.pad_token = tok.eos_token
    llama = _save(_llama(0), root / "llama", tok)
    for name, seed in (("llama-chat", 1), ("ft-a", 2), ("ft-b", 3), ("a", 4), ("b", 5)):
        _save(_llama(seed), root / name, tok)
    for alias in ("llama-7b", "base"):
        shutil.copytree(llama, root / alias)
    ws.convert(root / "llama-chat", root / "merged")  # written by weightsmith: verify has its manifest
    for name, seed in (("adapter", 1), ("math", 2), ("code", 3), ("lora", 4), ("chat", 5), ("qlora-adapter", 6)):
        _lora(llama, root / name, seed)
    ws.quantize(llama, root / "llama-nf4", scheme="nf4")
    ws.quantize(llama, root / "llama-int8", scheme="int8")
    shutil.copy(llama / "model.safetensors", root / "model.safetensors")
    shutil.copy(llama / "model.safetensors", root / "a.safetensors")
    shutil.copy(root / "llama-chat" / "model.safetensors", root / "b.safetensors")
    (root / "run").mkdir()
    _save(_llama(6), root / "run" / "checkpoint-500", tok)
    _save(_llama(7), root / "pruned-bin", tok, safe_serialization=False)

    gpt2 = build_model("gpt2")
    _save(gpt2, root / "gpt2")
    _save(gpt2, root / "gpt2-bin", safe_serialization=False)
    make_adapter(gpt2, root / "gpt2-adapter", seed=1, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    _save(build_model("bert_cls", seed=0), root / "bert")
    _save(build_model("bert_cls", seed=1), root / "bert-tuned")
    _save(build_model("qwen2"), root / "qwen2")
    _save(build_arch("t5"), root / "t5")  # the encoder-decoder export example
    ws.quantize(tiny_whisper(root / "whisper"), root / "whisper-int8", scheme="int8")  # the speech eval example
    write_clips(root / "clips")

    encoder = _save(_encoder(), root / "minilm", char_tokenizer(causal=False))  # with a pooler, as MiniLM
    shutil.copytree(encoder, root / "all-MiniLM-L6-v2")
    ws.quantize(encoder, root / "minilm-int8", scheme="int8")
    ws.prune(llama, root / "llama-pruned", structured="ffn", ratio=0.5)

    lines = SENTENCES * 3  # 96 lines
    for name in ("c.txt", "held.txt", "held_out.txt", "sentences.txt", "corpus.txt", "train.txt"):
        write_corpus(root / name, lines[:64])
    write_corpus(root / "train.jsonl", SENTENCES * 8, jsonl=True)  # enough steps to save a state to resume
    write_corpus(root / "val.jsonl", lines[64:80], jsonl=True)
    (root / "ties.yaml").write_text(
        "merge_method: ties\nbase_model: ./base\nmodels:\n"
        "  - model: ./ft-a\n    parameters: {weight: 0.6, density: 0.5}\n"
        "  - model: ./ft-b\n    parameters: {weight: 0.4, density: 0.5}\n"
        "dtype: float32\n"
    )
    (root / "recipe.yaml").write_text(
        json.dumps(
            {
                "input": "./llama",
                "output": "./shipped",
                "steps": [{"lora_merge": {"adapters": ["./adapter@0.8"]}}, {"quantize": {"scheme": "int8"}}],
            }
        )
    )
    return root


def _output(argv: list[str]) -> str | None:
    if argv[0] == "run":  # the recipe names its output
        return "shipped"
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-o", "--out"):
            return argv[i + 1]
    return None


EXAMPLES = _examples()


@pytest.mark.parametrize("line", EXAMPLES, ids=range(len(EXAMPLES)))
def test_help_example_runs(workspace, monkeypatch, capsys, line):
    monkeypatch.chdir(workspace)
    argv = shlex.split(line)[1:]
    out = _output(argv)
    if out is not None:  # (a resumed run: its output is absent, its saved training state beside it is not)
        target = workspace / out
        target = target.parent if target.suffix == ".onnx" else target
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, f"{line}\n{err}"


def test_examples_cover_every_command():
    commands = {shlex.split(line)[1] for line in EXAMPLES}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert commands == set(sub.choices)
