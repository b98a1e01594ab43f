"""Structured pruning of vision, speech, multimodal and seq2seq families (ViT, T5, BART, Whisper, CLIP): the smaller
checkpoint loads in transformers with no missing, mismatched or unexpected key, its config holds the new widths,
and its outputs equal the original model's with the removed neurons / heads zeroed (their output columns)."""

from __future__ import annotations

import pytest
import torch
from _architectures import build, inputs, model_class, output
from _loading import load_checked
from _prune_utils import head_columns

import weightsmith as ws
from weightsmith import architecture
from weightsmith.compress.prune import StructuredFFN, StructuredHeads
from weightsmith.compress.prune.structured import parse_ranges
from weightsmith.errors import ConfigError

# family → {report label prefix: (column-masked module name with {i}, config key path of the width)}
FFN = {
    "vit": {"": ("vit.encoder.layer.{i}.output.dense", "intermediate_size")},
    "t5": {
        "encoder": ("encoder.block.{i}.layer.1.DenseReluDense.wo", "d_ff"),
        "decoder": ("decoder.block.{i}.layer.2.DenseReluDense.wo", "d_ff"),
    },
    "bart": {
        "encoder": ("model.encoder.layers.{i}.fc2", "encoder_ffn_dim"),
        "decoder": ("model.decoder.layers.{i}.fc2", "decoder_ffn_dim"),
    },
    "whisper": {
        "encoder": ("model.encoder.layers.{i}.fc2", "encoder_ffn_dim"),
        "decoder": ("model.decoder.layers.{i}.fc2", "decoder_ffn_dim"),
    },
    "clip": {
        "text": ("text_model.encoder.layers.{i}.mlp.fc2", "text_config.intermediate_size"),
        "vision": ("vision_model.encoder.layers.{i}.mlp.fc2", "vision_config.intermediate_size"),
    },
    "qwen3": {"": ("model.layers.{i}.mlp.down_proj", "intermediate_size")},
    "gemma2": {"": ("model.layers.{i}.mlp.down_proj", "intermediate_size")},
    "opt": {"": ("model.decoder.layers.{i}.fc2", "ffn_dim")},
    "roberta": {"": ("roberta.encoder.layer.{i}.output.dense", "intermediate_size")},
    "distilbert": {"": ("distilbert.transformer.layer.{i}.ffn.lin2", "hidden_dim")},
    "gpt_neox": {"": ("gpt_neox.layers.{i}.mlp.dense_4h_to_h", "intermediate_size")},
}


def _saved(name: str, tmp_path):
    model = build(name)
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _width(config, path: str) -> int:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _zero_removed(model, kept: dict[str, str], label: str, module: str, units: int, head_dim: int | None = None):
    """Zero, in place, the output-projection columns of every unit the report says was removed."""
    with torch.no_grad():
        for key, ranges in kept.items():
            if key.removesuffix(key.split(" layer ")[-1]).removesuffix(" layer ").strip() != label and label:
                continue
            i = int(key.rsplit(" ", 1)[-1])
            gone = [u for u in range(units) if u not in set(parse_ranges(ranges))]
            cols = gone if head_dim is None else head_columns(gone, head_dim)
            model.get_parameter(module.format(i=i) + ".weight")[:, cols] = 0


def _hf_name(model, stored: str) -> str:
    """The parameter name transformers 5 gives a stored ViT name (it renames BERT-style names on load)."""
    names = dict(model.named_parameters())
    if stored in names:
        return stored
    renamed = stored.replace(".attention.output.dense", ".attention.o_proj").replace(".output.dense", ".mlp.fc2")
    renamed = renamed.replace("vit.encoder.layer.", "vit.layers.")
    return next(n for n in (renamed, stored.replace("encoder.layer.", "layers.")) if n in names)


@pytest.mark.parametrize("name", list(FFN))
def test_ffn_pruned_loads_and_equals_the_masked_original(name, tmp_path):
    src = _saved(name, tmp_path)
    report = ws.prune(src, tmp_path / "out", StructuredFFN(ratio=0.25))
    small = load_checked(model_class(name), tmp_path / "out")
    ref = model_class(name).from_pretrained(src).eval()
    kept = report.details["kept"]
    for label, (module, width) in FFN[name].items():
        assert _width(small.config, width) == 96 == _width(ref.config, width) - 32, (label, width)
        loaded = _hf_name(ref, module.format(i=0) + ".weight").replace(".0.", ".{i}.").removesuffix(".weight")
        _zero_removed(ref, kept, label, loaded, 128)
    assert len(kept) == 2 * len(FFN[name])  # 2 blocks per stack
    removed = sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in small.parameters())
    assert report.summary["params_before"] - report.summary["params_after"] == removed > 0
    batch = inputs(name)
    assert float((output(small.eval(), batch) - output(ref, batch)).abs().max()) <= 1e-5


def test_vit_heads_pruned_loads_and_equals_the_masked_original(tmp_path):
    src = _saved("vit", tmp_path)
    report = ws.prune(src, tmp_path / "out", StructuredHeads(keep_heads=2))
    small = load_checked(model_class("vit"), tmp_path / "out")
    assert (small.config.num_attention_heads, small.config.head_dim) == (2, 16)
    ref = model_class("vit").from_pretrained(src).eval()
    o_proj = _hf_name(ref, "vit.encoder.layer.0.attention.output.dense.weight").replace(".0.", ".{i}.")
    _zero_removed(ref, report.details["kept"], "", o_proj.removesuffix(".weight"), 4, head_dim=16)
    batch = inputs("vit")
    assert float((output(small.eval(), batch) - output(ref, batch)).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_decoder_heads_pruned_loads_and_equals_the_masked_original(name, tmp_path):
    """Qwen3 (per-head q/k norms) and Gemma 2 (explicit head_dim) lose query heads within each key/value group: 4
    query heads over 2 key/value heads keep one query head per group."""
    src = _saved(name, tmp_path)
    report = ws.prune(src, tmp_path / "out", StructuredHeads(keep_heads=2))
    small = load_checked(model_class(name), tmp_path / "out")
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    ref = model_class(name).from_pretrained(src).eval()
    _zero_removed(ref, report.details["kept"], "", "model.layers.{i}.self_attn.o_proj", 4, head_dim=16)
    batch = inputs(name)
    assert float((output(small.eval(), batch) - output(ref, batch)).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "name, config, message",
    [
        ("t5", StructuredHeads(ratio=0.5), "head pruning of t5 is not supported"),
        ("clip", StructuredHeads(ratio=0.5), "heads: llama, mistral, qwen2, qwen3, gemma, gemma2, vit"),
        ("vit", StructuredFFN(ratio=0.5, calibration="c.txt"), "activation scoring runs calibration text"),
        ("gpt2", StructuredFFN(ratio=0.5), "structured pruning supports llama, mistral, qwen2, qwen3, gemma, gemma2"),
    ],
)
def test_unsupported_combinations_refuse_in_one_line(name, config, message, tmp_path):
    src = _saved(name, tmp_path)
    with pytest.raises(ConfigError) as caught:
        ws.prune(src, tmp_path / "out", config)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_families_are_architecture_facts():
    assert {"vit", "t5", "bart", "whisper", "clip"} <= set(architecture.PRUNE_FAMILIES)
    assert [s.label for s in architecture.PRUNE_FAMILIES["clip"].stacks] == ["text", "vision"]
