"""Multi-stage merges (mergekit-multi's YAML: named documents, later ones using earlier names as models) run as
one job: equal to running the stages one by one with mergekit 0.1.5, the work directory gone afterwards."""

from __future__ import annotations

import pytest
import torch
import yaml
from _merge_utils import load, make_finetune, max_diff, mergekit_available, run_mergekit

import weightsmith as ws
from weightsmith.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("merge-stages")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    fts = [str(make_finetune(root / "base", root / f"ft{i}", seed=i + 1, scale=0.05)) for i in range(3)]
    return {"root": root, "base": str(root / "base"), "ft": fts}


def _stages(m) -> list[dict]:
    a, b, c = m["ft"]
    return [
        {
            "name": "ab",
            "merge_method": "ties",
            "base_model": m["base"],
            "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
            "parameters": {"density": 0.5},
        },
        {
            "merge_method": "slerp",
            "base_model": "ab",
            "slices": [{"sources": [{"model": "ab", "layer_range": [0, 3]}, {"model": "abc", "layer_range": [0, 3]}]}],
            "parameters": {"t": [0, 1]},
        },
        {
            "name": "abc",
            "merge_method": "linear",
            "models": [{"model": "ab", "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 0.5}}],
        },
    ]


def test_stages_run_as_one_job_and_equal_mergekit_stage_by_stage(models, tmp_path):
    if not mergekit_available():
        pytest.skip("mergekit is not installed")
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(_stages(models)))
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml", "out"]  # no work directory left

    ab, final, abc = (dict(s) for s in _stages(models))
    ab.pop("name"), abc.pop("name")
    mk_ab = run_mergekit(ab, tmp_path / "mk-ab")
    abc["models"][0]["model"] = str(mk_ab)
    mk_abc = run_mergekit(abc, tmp_path / "mk-abc")
    final["base_model"] = str(mk_ab)
    final["slices"][0]["sources"][0]["model"] = str(mk_ab)
    final["slices"][0]["sources"][1]["model"] = str(mk_abc)
    mk_final = run_mergekit(final, tmp_path / "mk-final")
    diff, where = max_diff(load(tmp_path / "out"), load(mk_final))
    assert diff <= 1e-6, f"max |Δ| {diff} at {where}"
    assert max_diff(load(tmp_path / "out"), load(mk_ab))[0] > 1e-3


def test_cycle_refused_before_anything_runs(models, tmp_path, capsys):
    docs = [
        {"name": "x", "merge_method": "linear", "models": [{"model": "y", "parameters": {"weight": 1}}]},
        {"name": "y", "merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]},
        {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]},
    ]
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(docs))
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the stages depend on each other in a cycle (x -> y -> x)" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]


def test_a_failing_stage_leaves_nothing(models, tmp_path):
    from weightsmith.errors import ConfigError

    docs = [
        {
            "name": "ab",
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1}} for m in models["ft"][:2]],
        },
        {"merge_method": "ties", "base_model": "ab", "models": [{"model": models["ft"][2]}]},  # no weight
    ]
    with pytest.raises(ConfigError, match="no value for parameter 'weight'"):
        ws.merge.run(yaml.safe_dump_all(docs), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
