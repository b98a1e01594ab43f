"""Helpers for the merge tests: fine-tunes of a tiny Llama, mergekit as the oracle, tensor comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

import weightsmith as ws


def make_base(out: Path, layers: int) -> Path:
    """A tiny fp32 Llama (hidden 32, 4 heads over 2 KV heads, vocab 64) of ``layers`` blocks, seed 0."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def make_finetune(base_dir: Path, out: Path, seed: int, scale: float = 0.02, frozen: tuple[str, ...] = ()) -> Path:
    """base + scale·N(0, 1) on every float tensor (except names containing a ``frozen`` substring)."""
    base = ws.open(base_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in base:
        t = base[name]
        if t.is_floating_point() and not any(f in name for f in frozen):
            t = t + scale * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)
        tensors[name] = t
    ws.save(tensors, out, config=base.config, carry=base.carry_files)
    return out


def mergekit_available() -> bool:
    try:
        import mergekit.merge  # noqa: F401
    except Exception:
        return False
    return True


def run_mergekit(config: dict, out: Path, seed: int | None = None) -> Path:
    """mergekit 0.1.5's own merge, in process (one import for the whole module)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    run_merge(
        cfg,
        str(out),
        options=MergeOptions(
            copy_tokenizer=False, quiet=True, write_model_card=False, random_seed=seed, lazy_unpickle=False
        ),
    )
    return out


def load(path: Path) -> dict[str, torch.Tensor]:
    ckpt = ws.open(path)
    return {n: ckpt[n] for n in ckpt}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    worst, where = 0.0, ""
    for n in a:
        d = float((a[n].double() - b[n].double()).abs().max())
        if d > worst:
            worst, where = d, n
    return worst, where


def write_yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def config_json(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
