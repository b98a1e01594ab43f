"""export safetensors: convert plus removal of training leftovers. The peer for pruning leftovers is
torch.nn.utils.prune.remove; transformers must load the result and compute what the pruned model computed."""

from __future__ import annotations

import json

import pytest
import torch
from _loading import load_checked
from conftest import build_model
from torch.nn.utils import prune

import weightsmith as ws
from weightsmith.cli import main

PRUNED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture
def training_checkpoint(tmp_path):
    """A tiny Llama saved mid-training as a flat .bin: two pruned Linears (weight_orig + weight_mask instead of
    weight), one stale pair beside a stored weight, and Adam state. Returns (dir, the pruned model)."""
    model = build_model("llama")
    for name in PRUNED:
        prune.l1_unstructured(model.get_submodule(name), "weight", amount=0.5)
    state = dict(model.state_dict())
    up = model.model.layers[0].mlp.up_proj.weight.detach()
    state["model.layers.0.mlp.up_proj.weight_orig"] = up * 2  # stale: the stored weight is the real one
    state["model.layers.0.mlp.up_proj.weight_mask"] = torch.ones_like(up)
    state["optimizer.state.0.exp_avg"] = torch.randn(4, 4)
    state["optimizer.state.0.step"] = torch.tensor(10.0)
    state["model.norm.weight.exp_avg_sq"] = torch.rand(64)
    state["lr_scheduler.last_epoch"] = torch.tensor(3)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    config = model.config.to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    return folder, model


def test_export_folds_prune_pairs_drops_training_state_and_loads_in_transformers(training_checkpoint, tmp_path):
    import transformers as tf

    src, pruned = training_checkpoint
    out = tmp_path / "clean"
    report = ws.export.safetensors(src, out)
    rows = {r["tensor"]: r["action"] for r in report.tensors}
    expected_dropped = [
        "optimizer.state.0.exp_avg",
        "optimizer.state.0.step",
        "model.norm.weight.exp_avg_sq",
        "lr_scheduler.last_epoch",
        "model.layers.0.mlp.up_proj.weight_orig",
        "model.layers.0.mlp.up_proj.weight_mask",
    ]
    assert sorted(n for n, a in rows.items() if a == "dropped") == sorted(expected_dropped)
    assert sorted(n for n, a in rows.items() if a == "folded") == sorted(
        f"{m}.weight_{s}" for m in PRUNED for s in ("orig", "mask")
    )
    assert report.summary["dropped"] == 6 and report.summary["folded"] == 2

    for name in PRUNED:  # the peer: make the pruning permanent
        prune.remove(pruned.get_submodule(name), "weight")
    reference = pruned.state_dict()
    written = ws.open(out)
    assert sorted(written) == sorted(reference)
    for name in written:
        assert torch.equal(written[name], reference[name]), name
    loaded = load_checked(tf.AutoModelForCausalLM, out).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, pruned(ids).logits)


def test_a_clean_checkpoint_is_copied_unchanged_single_file_and_cast(tiny_model, tmp_path):
    src = tiny_model("llama", shard_size="100KB")
    report = ws.export.safetensors(src, tmp_path / "one", single_file=True, shard_size="50KB", dtype="bf16")
    assert report.tensors == [] and report.summary["dropped"] == 0 and report.summary["shards"] == 1
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    source, written = ws.open(src), ws.open(tmp_path / "one")
    assert sorted(source) == sorted(written)
    for name in source:
        assert torch.equal(written[name], source[name].to(torch.bfloat16)), name
    ws.export.safetensors(src, tmp_path / "same")
    same = ws.open(tmp_path / "same")
    assert all(torch.equal(same[n], source[n]) for n in source)


def test_cli_refuses_mismatched_prune_mask(training_checkpoint, tmp_path, capsys):
    src, _ = training_checkpoint
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.layers.0.self_attn.q_proj.weight_mask"] = torch.ones(3, 3)
    torch.save(state, src / "pytorch_model.bin")
    out = tmp_path / "out"
    assert main(["export", "safetensors", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "q_proj.weight_mask" in err and "shape" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cli_refuses_a_checkpoint_of_only_training_state(tmp_path, capsys):
    src = tmp_path / "optim.safetensors"
    ws.save({"optimizer.state.0.exp_avg": torch.zeros(2)}, tmp_path / "tmp")
    (tmp_path / "tmp" / "model.safetensors").rename(src)
    out = tmp_path / "out"
    assert main(["export", "safetensors", str(src), "-o", str(out)]) == 2
    assert "no model tensors" in capsys.readouterr().err and not out.exists()
