"""``slices`` merges against mergekit 0.1.5: passthrough stacks (mergekit's own GPT-2 [0, 12] × 2 stack, a
two-model frankenmerge), per-slice gradients and parameters, ``scale``; the outputs load in transformers with no
missing or unexpected key and generate; bad slices are refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from _merge_utils import (
    config_json,
    load,
    make_base,
    make_finetune,
    max_diff,
    mergekit_available,
    run_mergekit,
    write_yaml,
)

import weightsmith as ws
from weightsmith.cli import main

LAYERS = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("merge-slices")
    make_base(root / "base", LAYERS)
    a, b = (make_finetune(root / "base", root / f"ft{i}", seed=i + 1, scale=0.05) for i in range(2))
    torch.manual_seed(1)
    gpt2 = root / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        gpt2
    )
    return {"root": root, "base": str(root / "base"), "a": str(a), "b": str(b), "gpt2": str(gpt2)}


def _src(model: str, start: int, end: int, **parameters) -> dict:
    entry: dict = {"model": model, "layer_range": [start, end]}
    if parameters:
        entry["parameters"] = parameters
    return entry


def _configs(m) -> dict[str, dict]:
    a, b = m["a"], m["b"]
    grad_t = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    return {
        "frankenmerge": {
            "merge_method": "passthrough",
            "slices": [{"sources": [_src(a, 0, 4)]}, {"sources": [_src(b, 2, 6)]}],
        },
        "gpt2_stack": {
            "merge_method": "passthrough",
            "slices": [{"sources": [_src(m["gpt2"], 0, 12)]}] * 2,
        },
        "scaled": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [_src(a, 0, 3)]},
                {"sources": [_src(a, 3, 6, scale=[{"filter": "o_proj", "value": 0.0}, {"value": 0.5}])]},
            ],
        },
        "gradient_slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "slices": [{"sources": [_src(a, 0, LAYERS), _src(b, 0, LAYERS)]}],
            "parameters": {"t": grad_t},
        },
        "per_slice": {
            "merge_method": "slerp",
            "base_model": a,
            "slices": [
                {"sources": [_src(a, 0, 2), _src(b, 0, 2)], "parameters": {"t": 0.2}},
                {"sources": [_src(a, 2, 6), _src(b, 2, 6)], "parameters": {"t": [0, 1]}},
                {"sources": [_src(a, 4, 6), _src(b, 1, 3)]},
            ],
            "parameters": {"t": 0.7},
        },
        "per_source": {
            "merge_method": "linear",
            "slices": [
                {"sources": [_src(a, 0, 3, weight=0.3), _src(b, 0, 3, weight=[1.0, 0.2])]},
                {"sources": [_src(b, 3, 6), _src(a, 3, 6)], "parameters": {"weight": 0.5}},
            ],
        },
    }


@pytest.fixture(scope="module")
def mk(models):
    if not mergekit_available():
        pytest.skip("mergekit is not installed")
    return {n: run_mergekit(copy.deepcopy(c), models["root"] / f"mk-{n}") for n, c in _configs(models).items()}


@pytest.mark.parametrize("name", ["frankenmerge", "gpt2_stack", "scaled", "gradient_slerp", "per_slice", "per_source"])
def test_parity_with_mergekit(models, mk, name, tmp_path):
    ws.merge.run(_configs(models)[name], tmp_path / "out")
    ours, theirs = load(tmp_path / "out"), load(mk[name])
    diff, where = max_diff(ours, theirs)
    assert diff <= 1e-6, f"{name}: max |Δ| {diff} at {where}"
    ours_cfg, theirs_cfg = config_json(tmp_path / "out"), config_json(mk[name])
    key = "n_layer" if "n_layer" in theirs_cfg else "num_hidden_layers"
    assert ours_cfg[key] == theirs_cfg[key]


def test_gpt2_stack_has_24_layers_and_copies_stored_bytes(models, tmp_path):
    ws.merge.run(_configs(models)["gpt2_stack"], tmp_path / "out")
    assert config_json(tmp_path / "out")["n_layer"] == 24
    ours, src = ws.open(tmp_path / "out"), ws.open(models["gpt2"])
    for i in range(12):
        for j in (i, i + 12):
            name = f"transformer.h.{j}.mlp.c_fc.weight"
            assert torch.equal(ours[name], src[f"transformer.h.{i}.mlp.c_fc.weight"])


def test_frankenmerge_loads_in_transformers_and_generates(models, tmp_path):
    import transformers as tf

    ws.merge.run(_configs(models)["frankenmerge"], tmp_path / "out")
    model, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_hidden_layers == 8
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    b = ws.open(models["b"])  # output layer 4 is layer 2 of b, the head is b's (the last slice's)
    assert torch.equal(model.model.layers[4].mlp.up_proj.weight.detach(), b["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(model.lm_head.weight.detach(), b["lm_head.weight"])


@pytest.mark.parametrize(
    "slices, expected",
    [
        ([{"sources": [_src("A", 0, 7)]}], "slices[0]: layer_range [0, 7] of A is past its depth (6 layers)"),
        (
            [{"sources": [_src("A", 0, 4), _src("B", 0, 3)]}],
            "slices[0]: the sources' layer_range lengths differ",
        ),
        ([{"sources": [{"model": "A", "layer_range": [3, 1]}]}], "layer_range must be [start, end)"),
        ([{"sources": [_src("A", 0, 2)], "residual_weight": 0.5}], "unsupported key 'residual_weight'"),
    ],
)
def test_bad_slices_refused(models, slices, expected, tmp_path, capsys):
    paths = {"A": models["a"], "B": models["b"]}
    for sl in slices:
        for src in sl["sources"]:
            src["model"] = paths[src["model"]]
    expected = expected.replace(" A ", f" {models['a']} ")
    method = "linear" if len(slices[0]["sources"]) > 1 else "passthrough"
    path = write_yaml({"merge_method": method, "slices": slices}, tmp_path / "bad.yaml")
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
