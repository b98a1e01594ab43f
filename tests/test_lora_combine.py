"""lora combine and lora resize: adapters made by PEFT, combined or resized by weightsmith, loaded back by PEFT.

The oracle for ``cat`` is folding each input with its weight (itself checked against PEFT's merge_and_unload in
test_lora.py); the combined adapter is loaded with ``PeftModel.from_pretrained`` and merged by PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _lora_utils import ids, load, make_adapter, max_abs, peft_merged
from conftest import build_model

import weightsmith as ws
from weightsmith.errors import ConfigError, IncompatibleError

warnings.filterwarnings("ignore", module="peft")


@pytest.fixture
def two_adapters(tmp_path):
    """Different ranks (4 with a rank/alpha pattern, and 2), rsLoRA on the second, overlapping targets."""
    a = make_adapter(
        build_model("llama"),
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={r"layers\.1\.self_attn\.v_proj": 3},
        alpha_pattern={"q_proj": 5},
        seed=1,
    )
    b = make_adapter(
        build_model("llama"),
        tmp_path / "b",
        r=2,
        lora_alpha=6,
        target_modules=["v_proj", "down_proj"],
        use_rslora=True,
        seed=2,
    )
    return a, b


def test_cat_equals_folding_each_input(two_adapters, tiny_model, tmp_path):
    a, b = two_adapters
    base = tiny_model("llama")
    report = ws.lora.combine([(a, 0.7), (b, -0.4)], tmp_path / "ab")
    ranks = {row["module"]: row["rank"] for row in report.tensors}
    assert ranks["model.layers.0.self_attn.v_proj"] == 4 + 2 and ranks["model.layers.1.self_attn.v_proj"] == 3 + 2
    assert ranks["model.layers.0.mlp.down_proj"] == 2 and ranks["model.embed_tokens"] == 4
    theirs = peft_merged("llama", base, tmp_path / "ab")  # PEFT loads and folds the combined adapter
    ws.lora.merge(base, [(a, 0.7), (b, -0.4)], tmp_path / "folded")
    ours = dict(ws.open(tmp_path / "folded"))
    worst, where = max_abs(ours, theirs, list(theirs))
    assert worst <= 1e-5, (where, worst)
    assert sum(not torch.equal(ours[n], ws.open(base)[n]) for n in theirs) == 2 * 3 + 1
    # the sign of a weight matters (PEFT's linear combination would make −0.4 and +0.4 alike)
    ws.lora.combine([(a, 0.7), (b, 0.4)], tmp_path / "ab_plus")
    plus = peft_merged("llama", base, tmp_path / "ab_plus")
    name = "model.layers.0.mlp.down_proj.weight"
    assert float((plus[name] - theirs[name]).abs().max()) > 1e-3


def test_svd_full_rank_is_exact_and_truncation_reports_energy(two_adapters, tiny_model, tmp_path):
    a, b = two_adapters
    base = tiny_model("llama")
    exact = ws.lora.combine([(a, 0.7), (b, -0.4)], tmp_path / "full", method="svd", rank=6)
    assert all(row["energy_kept"] >= 1 - 1e-6 for row in exact.tensors)
    ws.lora.merge(base, [(a, 0.7), (b, -0.4)], tmp_path / "folded")
    worst, _ = max_abs(dict(ws.open(tmp_path / "folded")), peft_merged("llama", base, tmp_path / "full"))
    assert worst <= 1e-5
    cut = ws.lora.combine([(a, 0.7), (b, -0.4)], tmp_path / "r2", method="svd", rank=2)
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    folded, merged = ws.open(tmp_path / "folded"), peft_merged("llama", base, tmp_path / "r2")
    b_ck = ws.open(base)
    for row in cut.tensors:  # the energy reported is what the truncated adapter really keeps
        name = row["module"] + ".weight"
        delta = (folded[name] - b_ck[name]).double()
        lost = float(((merged[name] - folded[name]).double().norm() / delta.norm()) ** 2)
        assert abs(lost - (1 - row["energy_kept"])) <= 1e-4, name
    assert any(row["energy_kept"] < 0.999 for row in cut.tensors)
    by_energy = ws.lora.combine([(a, 0.7), (b, -0.4)], tmp_path / "e", method="svd", energy=0.9)
    assert all(row["energy_kept"] >= 0.9 for row in by_energy.tensors)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_on_the_deltas(method, two_adapters, tiny_model, tmp_path):
    from weightsmith.merge import methods as M
    from weightsmith.merge.engine import tensor_seed

    a, b = two_adapters
    base = tiny_model("llama")
    report = ws.lora.combine([(a, 0.7), (b, 0.5)], tmp_path / "m", method=method, density=0.4, seed=3, energy=1.0)
    assert all(row["rank"] > 6 for row in report.tensors if row["module"].endswith("v_proj"))  # TIES/DARE: full rank
    merged, b_ck = peft_merged("llama", base, tmp_path / "m"), ws.open(base)
    ones = [ws.lora.open_folded(base, [(x, 1.0)]) for x in (a, b)]
    name, module = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj"
    deltas = [(f[name] - b_ck[name]) for f in ones]  # [out, in] for Linear
    zero = torch.zeros_like(deltas[0])
    if method == "ties":
        want = M.ties(zero, deltas, [0.7, 0.5], [0.4, 0.4])
    else:
        want = M.dare_ties(zero, deltas, [0.7, 0.5], [0.4, 0.4], [tensor_seed(3, module, i) for i in (0, 1)])
    assert float((merged[name] - b_ck[name] - want).abs().max()) <= 1e-5


def test_resize_by_rank_threshold_and_energy(tiny_model, tmp_path):
    base = tiny_model("llama")
    adapter = make_adapter(build_model("llama"), tmp_path / "a", r=8, lora_alpha=16, target_modules="all-linear")
    report = ws.lora.resize(adapter, tmp_path / "r3", rank=3)
    assert {row["rank"] for row in report.tensors} == {3} and report.summary["r"] == 3
    ws.lora.merge(base, [adapter], tmp_path / "full")
    full, cut, b_ck = ws.open(tmp_path / "full"), peft_merged("llama", base, tmp_path / "r3"), ws.open(base)
    for row in report.tensors:
        name = row["module"] + ".weight"
        delta = (full[name] - b_ck[name]).double()
        lost = float(((cut[name] - full[name]).double().norm() / delta.norm()) ** 2)
        assert abs(lost - (1 - row["energy_kept"])) <= 1e-4, name
    # a rank-2 ΔW inside a rank-8 adapter: the threshold finds rank 2 and keeps it exactly
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    for key in tensors:
        if key.endswith("lora_A.weight"):
            tensors[key][2:] = 0
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    auto = ws.lora.resize(adapter, tmp_path / "auto", threshold=1e-5)
    assert {row["rank"] for row in auto.tensors} == {2} and auto.summary["rank_sum_after"] == 2 * 14
    ws.lora.merge(base, [adapter], tmp_path / "full2")
    worst, _ = max_abs(dict(ws.open(tmp_path / "full2")), peft_merged("llama", base, tmp_path / "auto"))
    assert worst <= 1e-5
    energy = ws.lora.resize(adapter, tmp_path / "e", energy=0.5)
    assert all(row["energy_kept"] >= 0.5 and row["rank"] <= 2 for row in energy.tensors)
    model = load("llama", base)
    from peft import PeftModel

    with torch.no_grad():
        PeftModel.from_pretrained(model, tmp_path / "e")(**ids())


def test_combine_refusals(tiny_model, tmp_path):
    dora = make_adapter(build_model("llama"), tmp_path / "d", r=2, target_modules=["q_proj"], use_dora=True)
    plain = make_adapter(build_model("llama"), tmp_path / "p", r=2, target_modules=["q_proj"])
    with pytest.raises(IncompatibleError, match="DoRA rescales rows"):
        ws.lora.combine([dora, plain], tmp_path / "o")
    with pytest.raises(ConfigError, match="for the SVD"):
        ws.lora.combine([plain, plain], tmp_path / "o", method="svd")
    with pytest.raises(ConfigError, match="cat is exact"):
        ws.lora.combine([plain, plain], tmp_path / "o", rank=2)
    with pytest.raises(IncompatibleError, match="cancel out"):
        ws.lora.combine([(plain, 1.0), (plain, -1.0)], tmp_path / "o", method="svd", rank=2)
    assert not (tmp_path / "o").exists()


def test_combine_and_resize_cli(two_adapters, tmp_path):
    from weightsmith.cli import main

    a, b = two_adapters
    assert main(["lora", "combine", f"{a}@0.7", f"{b}@-0.4", "-o", str(tmp_path / "ab")]) == 0
    assert main(["lora", "resize", str(tmp_path / "ab"), "-o", str(tmp_path / "ab2"), "--rank", "2"]) == 0
    assert json.loads((tmp_path / "ab2" / "adapter_config.json").read_text())["r"] == 2
