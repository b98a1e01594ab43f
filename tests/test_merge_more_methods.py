"""The methods mergekit 0.1.5 has beyond the classic ones — sce, karcher, multislerp, nearswap, arcee_fusion, ram,
ramplus_tl — against mergekit itself on the same YAML, plus their refusals and their rows in the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from _merge_utils import load, make_base, make_finetune, max_diff, mergekit_available, run_mergekit, write_yaml

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.merge import selective, spherical


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-layer fp32 Llama base and three fine-tunes (the third leaves the norms untouched: exact zeros in δ)."""

    root = tmp_path_factory.mktemp("merge-more")
    make_base(root / "base", 3)
    fts = [
        make_finetune(root / "base", root / f"ft{i}", seed=i + 1, frozen=("norm",) if i == 2 else ()) for i in range(3)
    ]
    return {"root": root, "base": str(root / "base"), "ft": [str(f) for f in fts]}


def _configs(m) -> dict[str, dict]:
    base, (a, b, c) = m["base"], m["ft"]
    three = [{"model": x} for x in (a, b, c)]
    return {
        "sce": {"merge_method": "sce", "base_model": base, "models": three, "parameters": {"select_topk": 0.6}},
        "sce_all": {"merge_method": "sce", "base_model": base, "models": three[:2]},
        "karcher": {"merge_method": "karcher", "models": three},
        "karcher_base": {
            "merge_method": "karcher",
            "base_model": base,
            "models": three[:2],
            "parameters": {"max_iter": 3},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [{"model": x, "parameters": {"weight": w}} for x, w in ((a, 0.5), (b, 0.3), (c, 0.8))],
        },
        "multislerp_nobase": {
            "merge_method": "multislerp",
            "models": [{"model": x, "parameters": {"weight": w}} for x, w in ((a, 1.0), (b, 2.0))],
            "parameters": {"normalize_weights": True},
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": a}],
            "parameters": {"t": [0.01, 0.05]},
        },
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": b}]},
        "ram": {"merge_method": "ram", "base_model": base, "models": three, "parameters": {"epsilon": 0.01}},
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": three,
            "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.6},
        },
    }


@pytest.fixture(scope="module")
def mk(models):
    if not mergekit_available():
        pytest.skip("mergekit is not installed")
    return {
        name: run_mergekit(copy.deepcopy(cfg), models["root"] / f"mk-{name}") for name, cfg in _configs(models).items()
    }


@pytest.mark.parametrize(
    "name",
    [
        "sce",
        "sce_all",
        "karcher",
        "karcher_base",
        "multislerp",
        "multislerp_nobase",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    ],
)
def test_parity_with_mergekit(models, mk, name, tmp_path):
    ws.merge.run(_configs(models)[name], tmp_path / "out")
    ours, theirs = load(tmp_path / "out"), load(mk[name])
    diff, where = max_diff(ours, theirs)
    assert diff <= 1e-6, f"{name}: max |Δ| {diff} at {where}"
    changed, _ = max_diff(ours, load(models["base"]))
    assert changed > 1e-4  # the merge did something


def test_short_form_takes_new_method_parameters(models, mk, tmp_path):
    """The CLI's flags come from the method table: --select-topk reaches sce."""
    a, b, c = models["ft"]
    args = ["merge", "--method", "sce", "--base", models["base"], "--model", a, "--model", b, "--model", c]
    assert main([*args, "--select-topk", "0.6", "-o", str(tmp_path / "out")]) == 0
    assert max_diff(load(tmp_path / "out"), load(mk["sce"]))[0] <= 1e-6


def test_ram_unique_and_shared_entries():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0.0, 3.0, 4.0, 0.0])
    assert selective.ram(base, [a, b]).tolist() == [1.0, 3.0, 3.0, 0.0]
    # one shared entry and one unique entry each: ρ = 1, λ = 1 + 0.5·min(1, 0.2) = 1.1
    assert torch.allclose(selective.ramplus_tl(base, [a, b], r=0.5), torch.tensor([1.1, 3.3, 3.0, 0.0]))


def test_nearswap_takes_close_values():
    base, other = torch.tensor([0.0, 0.0]), torch.tensor([0.001, 1.0])
    out = selective.nearswap(base, other, t=0.01)
    assert out[0] == other[0] and abs(float(out[1]) - 0.01) < 1e-7  # w = t/|δ| = 0.01


def test_karcher_of_orthogonal_unit_vectors_is_their_bisector():
    out = spherical.karcher([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    assert torch.allclose(out, torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-6)


def test_multislerp_keeps_the_mean_norm():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    out = spherical.multislerp([a, b], [1.0, 1.0])
    assert abs(float(out.norm()) - 3.0) < 1e-5


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"merge_method": "nearswap", "models": "two"}, "nearswap takes 1 models besides the base, got 2"),
        ({"merge_method": "arcee_fusion", "base_model": None}, "arcee_fusion needs a base_model"),
        ({"merge_method": "sce", "parameters": {"select_topk": 1.5}}, "select_topk 1.5 is outside [0, 1]"),
        ({"merge_method": "karcher", "parameters": {"max_iter": 2.5}}, "'max_iter' must be a whole number"),
        ({"merge_method": "multislerp", "models": "two"}, "no value for parameter 'weight'"),
    ],
)
def test_bad_configs_refused(models, patch, expected, tmp_path, capsys):
    base, (a, b, _) = models["base"], models["ft"]
    cfg = {"base_model": base, "models": [{"model": a}], **patch}
    if cfg["models"] == "two":
        cfg["models"] = [{"model": a}, {"model": b}]
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = write_yaml(cfg, tmp_path / "bad.yaml")
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_docs_method_table_is_the_table():
    """docs/merge.md embeds the method table as rendered from the table itself (no second copy to drift)."""
    from pathlib import Path

    from weightsmith.merge import table

    doc = (Path(__file__).parent.parent / "docs" / "merge.md").read_text()
    embedded = doc.split("<!-- method-table:start -->\n", 1)[1].split("\n<!-- method-table:end -->", 1)[0]
    assert embedded == table.markdown()
    assert set(table.names()) >= {"sce", "karcher", "multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}


def test_block_wise_selection_matches_mergekit_on_a_large_tensor():
    """Past the size where the thresholds are found from a sample and a bracket (sparsify.count_cut), SCE's variance
    selection and Arcee Fusion's quantiles still equal mergekit's own helpers (float32 inputs: bf16 ones tie at SCE's
    variance threshold, where mergekit keeps whichever torch.topk returns and weightsmith the lower index)."""
    if not mergekit_available():
        pytest.skip("mergekit is not installed")
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.merge_methods.sce import sce_mask, sce_weight

    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(640, 1000, generator=g)  # 640k entries: above count_cut's exact size
    tuned = [base + 0.002 * torch.randn(640, 1000, generator=g) for _ in range(3)]
    b, ts = base, tuned

    tvs = torch.stack([t - b for t in ts])
    tvs = tvs * sce_mask(tvs, 0.4, torch.float32).unsqueeze(0)
    erased = sce_weight(tvs).view(-1, 1, 1) * get_mask(tvs, method="sum", mask_dtype=torch.float32)
    expected = b + (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    got = selective.sce(base, tuned, select_topk=0.4)
    assert (got - expected).abs().max() <= 1e-6

    got = selective.arcee_fusion(base.bfloat16(), tuned[0].bfloat16(), out_dtype=torch.bfloat16)
    b16, t16 = base.bfloat16().float(), tuned[0].bfloat16().float()  # bf16 in and out: mergekit in float32 on them
    mask, _ = DynamicThresholdFusion().compute_fusion_mask(_compute_importance(t16, b16))
    assert got.dtype == torch.bfloat16 and torch.equal(got, (b16 + (t16 - b16) * mask).bfloat16())
