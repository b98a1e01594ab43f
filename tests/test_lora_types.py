"""Folding the PEFT adapter types other than LoRA (AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT), against PEFT itself:
adapters made by PEFT with every trainable tensor perturbed (VeRA's lambda_b and IA³'s vectors are no-ops at their
defaults), folded by weightsmith, compared with ``merge_and_unload()`` tensor by tensor and with the unmerged PEFT
model's outputs; then unmerge, mixed types in one fold, and the refusals."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from _lora_utils import AUTO, ids, max_abs, model_logits, peft_logits, peft_merged, perturb_trainable
from conftest import build_model
from safetensors.torch import save_file

import weightsmith as ws
from weightsmith.errors import IncompatibleError

warnings.filterwarnings("ignore", module="peft")

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = [*LLAMA_ATTN, "gate_proj", "up_proj", "down_proj"]


def peft_config(peft_type: str, targets, **kw):
    import peft

    defaults = {
        "ADALORA": (peft.AdaLoraConfig, {"init_r": 6, "target_r": 2, "lora_alpha": 8, "total_step": 10}),
        "IA3": (peft.IA3Config, {}),
        "LOHA": (peft.LoHaConfig, {"r": 4, "alpha": 8}),
        "LOKR": (peft.LoKrConfig, {"r": 4, "alpha": 6}),
        "VERA": (peft.VeraConfig, {"r": 8}),
        "OFT": (peft.OFTConfig, {"r": 0, "oft_block_size": 8}),
        "BOFT": (peft.BOFTConfig, {"boft_block_size": 4}),
    }
    cls, options = defaults[peft_type]
    return cls(target_modules=targets, **{**options, **kw})


def make_typed(model, out, peft_type: str, targets, seed: int = 1, scale: float = 0.05, adalora_pattern=None, **kw):
    """A PEFT adapter of ``peft_type`` on ``model``, every trainable tensor perturbed, saved to ``out``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config(peft_type, targets, **kw))
    perturb_trainable(peft_model, seed, 0.3 if peft_type == "IA3" else scale)
    if adalora_pattern is not None:  # AdaLoRA's budget allocation as training leaves it: triplets pruned per module
        peft_model.peft_config["default"].rank_pattern = adalora_pattern
    peft_model.save_pretrained(out)
    return out


# (model kind, peft type, targets, extra config): every pair PEFT accepts (LoHa, LoKr and OFT refuse Conv1D)
CASES = {
    "llama-adalora": ("llama", "ADALORA", ["q_proj", "v_proj", "down_proj"], {}),
    "llama-ia3": ("llama", "IA3", ["k_proj", "v_proj", "down_proj"], {"feedforward_modules": ["down_proj"]}),
    "llama-loha": ("llama", "LOHA", LLAMA_ALL, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3}}),
    "llama-lokr": ("llama", "LOKR", LLAMA_ALL, {}),
    "llama-lokr-decomposed": ("llama", "LOKR", ["q_proj", "up_proj"], {"decompose_both": True, "r": 2}),
    "llama-vera": ("llama", "VERA", ["q_proj", "v_proj", "down_proj"], {}),
    "llama-oft": ("llama", "OFT", [*LLAMA_ATTN, "embed_tokens"], {}),
    "llama-oft-exact-cayley": ("llama", "OFT", ["q_proj", "up_proj"], {"use_cayley_neumann": False}),
    "llama-oft-shared-coft": ("llama", "OFT", ["q_proj", "o_proj"], {"block_share": True, "coft": True}),
    "llama-boft": ("llama", "BOFT", ["q_proj", "k_proj", "up_proj", "down_proj"], {}),
    "gpt2-adalora": ("gpt2", "ADALORA", ["c_attn", "c_fc"], {}),
    "gpt2-ia3": ("gpt2", "IA3", ["c_attn", "mlp.c_proj", "c_fc"], {"feedforward_modules": ["mlp.c_proj"]}),
    "gpt2-vera": ("gpt2", "VERA", ["c_attn", "c_fc"], {}),
    "bert-adalora": ("bert", "ADALORA", ["query", "value"], {}),
    "bert-ia3": ("bert", "IA3", ["key", "value", "output.dense"], {"feedforward_modules": ["output.dense"]}),
    "bert-loha": ("bert", "LOHA", ["query", "value"], {}),
    "bert-lokr": ("bert", "LOKR", ["query", "intermediate.dense"], {}),
    "bert-vera": ("bert", "VERA", ["query", "value"], {"save_projection": False}),
    "bert-oft": ("bert", "OFT", ["query", "value", "word_embeddings"], {}),
    "bert-boft": (
        "bert",
        "BOFT",
        ["query", "value", "intermediate.dense"],
        {"boft_block_size": 0, "boft_block_num": 8},
    ),
}


def _check_loads(kind: str, path) -> None:
    import transformers as tf

    _, info = getattr(tf, AUTO[kind]).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("case", list(CASES))
def test_fold_matches_peft(case, tiny_model, tmp_path):
    kind, peft_type, targets, extra = CASES[case]
    base = tiny_model(kind)
    adapter = make_typed(build_model(kind), tmp_path / "adapter", peft_type, targets, **extra)
    report = ws.lora.merge(base, [adapter], tmp_path / "merged")
    assert report.summary["types"] == [peft_type]
    ours = dict(ws.open(tmp_path / "merged"))
    theirs = peft_merged(kind, base, adapter)
    names = [n for n in theirs if n in ours]
    assert set(theirs) - set(names) <= set(ws.open(base).tied_weights)
    worst, where = max_abs(ours, theirs, names)
    assert worst <= 1e-6, (where, worst)
    changed = [n for n in names if not torch.equal(ours[n], ws.open(base)[n])]
    assert len(changed) >= 2, "the adapter changed (almost) nothing"
    _check_loads(kind, tmp_path / "merged")
    inputs = ids()
    got = model_logits(kind, tmp_path / "merged", inputs)
    want = peft_logits(kind, base, adapter, inputs)
    assert float((got - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_rows_equal_the_folded_view(case, tiny_model, tmp_path, monkeypatch):
    """``lora merge`` folds each weight it can a block of rows at a time, read from the base file straight into the
    writer's pieces (tiny pieces here: many per weight); the whole-tensor reads of ``open_folded`` give the same
    bytes, in the base's dtype and cast to another."""
    from weightsmith.checkpoint import writer

    monkeypatch.setattr(writer, "PIECE_BYTES", 300)
    kind, peft_type, targets, extra = CASES[case]
    base = tiny_model(kind)
    adapter = make_typed(build_model(kind), tmp_path / "adapter", peft_type, targets, **extra)
    for dtype in (None, "bfloat16"):
        ws.lora.merge(base, [adapter], tmp_path / f"m-{dtype}", dtype=dtype)
        folded, written = ws.lora.open_folded(base, [adapter], dtype=dtype), ws.open(tmp_path / f"m-{dtype}")
        streamed = [n for n in folded.changed if folded.rows(n) is not None]
        assert streamed, "no weight took the rows path"
        for name in written:
            assert written[name].dtype == folded[name].dtype and torch.equal(written[name], folded[name]), name


def test_adalora_rank_pattern_matches_peft(tiny_model, tmp_path):
    base = tiny_model("llama")
    pattern = {
        "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True, False, True],
        "model.layers.1.self_attn.v_proj.lora_E": [False, False, True, False, False, False],
        "model.layers.0.self_attn.v_proj.lora_E": [False] * 6,  # every triplet pruned: ΔW = 0
    }
    adapter = make_typed(build_model("llama"), tmp_path / "a", "ADALORA", ["q_proj", "v_proj"], adalora_pattern=pattern)
    assert ws.open(adapter).info("base_model.model.model.layers.0.self_attn.q_proj.lora_A").shape[0] == 4
    ws.lora.merge(base, [adapter], tmp_path / "m")
    ours, theirs = dict(ws.open(tmp_path / "m")), peft_merged("llama", base, adapter)
    worst, where = max_abs(ours, theirs, list(theirs))
    assert worst <= 1e-6, (where, worst)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(ours[name], ws.open(base)[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adalora_fold_is_bit_identical_to_peft(dtype, tiny_model, tmp_path):
    """PEFT scales AdaLoRA's product by α and then divides by ranknum + 1e-5, each step rounded in float32; the fold
    takes the same two steps (one scale α/d would differ in the last bit of some elements, and on a half-precision
    base by several units in the last place where W + ΔW nearly cancels)."""
    from weightsmith.merge.lora import kinds

    base = tiny_model("llama", dtype=dtype)
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = make_typed(build_model("llama"), tmp_path / "a", "ADALORA", targets, lora_alpha=7, scale=0.2)
    ws.lora.merge(base, [adapter], tmp_path / "m")
    ours, theirs = dict(ws.open(tmp_path / "m")), peft_merged("llama", base, adapter, dtype=getattr(torch, dtype))
    assert all(torch.equal(ours[n], t) for n, t in theirs.items())
    # the one-factor scale is not PEFT's rounding: somewhere its ΔW differs
    alpha, d = kinds.adalora_scaling(7.0, 6)
    ad, prefix = ws.open(adapter), "base_model.model.model.layers.0.self_attn.q_proj."
    a, b, e = (ad[prefix + p] for p in ("lora_A", "lora_B", "lora_E"))
    product = b @ kinds.adalora_a(a, e)
    assert not torch.equal(product * (alpha / d), product * alpha / torch.tensor(d))


ALL_TYPES = ["ADALORA", "IA3", "LOHA", "LOKR", "VERA", "OFT", "BOFT"]


@pytest.mark.parametrize("peft_type", ALL_TYPES)
def test_bf16_base_within_one_ulp_of_peft(peft_type, tiny_model, tmp_path):
    base = tiny_model("llama", dtype="bfloat16")
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = make_typed(build_model("llama"), tmp_path / "a", peft_type, targets)
    ws.lora.merge(base, [adapter], tmp_path / "m")
    ours = dict(ws.open(tmp_path / "m"))
    theirs = peft_merged("llama", base, adapter, dtype=torch.bfloat16)
    changed = 0
    for name, t in theirs.items():
        assert ours[name].dtype == torch.bfloat16
        a, b = ours[name].view(torch.int16).int(), t.view(torch.int16).int()
        assert int((a - b).abs().max()) <= 1, name
        changed += int(not torch.equal(ours[name], ws.open(base)[name]))
    assert changed >= 4


def test_conv_types_match_peft(tmp_path):
    from peft import PeftModel, get_peft_model

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 1),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 6 * 6, 16),
        ).eval()

    save_file({k: v.contiguous() for k, v in net().state_dict().items()}, tmp_path / "base.safetensors")
    x = torch.randn(2, 4, 8, 8)
    configs = {
        "LOHA": {"use_effective_conv2d": True},
        "LOHA-flat": {},
        "LOKR": {},
        "LOKR-effective": {"use_effective_conv2d": True, "decompose_both": True, "r": 1},
        "IA3": {"feedforward_modules": ["2"]},
        "OFT": {"oft_block_size": 4},
        "BOFT": {"boft_block_size": 4},
    }
    for label, extra in configs.items():
        peft_type = label.split("-")[0]
        cfg = peft_config(peft_type, ["0", "2", "4"], **extra)
        peft_model = get_peft_model(net(), cfg)
        perturb_trainable(peft_model, 3, 0.3 if peft_type == "IA3" else 0.05)
        with torch.no_grad():
            want_out = peft_model(x)
        adapter = tmp_path / label
        peft_model.save_pretrained(adapter)
        ws.lora.merge(tmp_path / "base.safetensors", [adapter], tmp_path / f"m-{label}")
        ours = dict(ws.open(tmp_path / f"m-{label}"))
        theirs = PeftModel.from_pretrained(net(), adapter).merge_and_unload().state_dict()
        worst, where = max_abs(ours, theirs)
        assert worst <= 1e-6, (label, where, worst)
        assert not torch.equal(ours["0.weight"], net().state_dict()["0.weight"]), label
        plain = net()
        plain.load_state_dict(ours)
        if peft_type in ("OFT", "BOFT"):  # PEFT's OFT forward on a k×k conv (k > 1) folds its rotated patches back with
            plain[0] = peft_model.base_model.model[0]  # F.fold, which its own merge does not match: skip layer 0
        with torch.no_grad():
            assert float((plain(x) - want_out).abs().max()) <= 1e-4, label


@pytest.mark.parametrize("peft_type", ALL_TYPES)
def test_unmerge_restores_the_base(peft_type, tiny_model, tmp_path):
    kind = "gpt2" if peft_type in ("IA3", "VERA") else "llama"  # Conv1D where PEFT allows it
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    base = tiny_model(kind)
    adapter = make_typed(build_model(kind), tmp_path / "a", peft_type, targets)
    weight = 1.0 if peft_type == "BOFT" else 0.6  # BOFT at w ≠ 1 is no rotation: refused below
    ws.lora.merge(base, [(adapter, weight)], tmp_path / "m")
    assert ws.diff(base, tmp_path / "m").summary["differ"] >= 4
    ws.lora.unmerge(tmp_path / "m", (adapter, weight), tmp_path / "back")
    assert ws.diff(base, tmp_path / "back").summary["max_abs"] <= 1e-5


def test_boft_unmerge_at_another_weight_is_refused(tiny_model, tmp_path):
    base = tiny_model("llama")
    adapter = make_typed(build_model("llama"), tmp_path / "a", "BOFT", ["q_proj"])
    ws.lora.merge(base, [(adapter, 0.6)], tmp_path / "m")
    with pytest.raises(IncompatibleError, match="folded at weight 0.6 mixes W with its rotated, rescaled copy"):
        ws.lora.unmerge(tmp_path / "m", (adapter, 0.6), tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_boft_butterfly_factors_match_peft(tiny_model, tmp_path, monkeypatch):
    """boft_n_butterfly_factor > 1: PEFT builds the factors only with its CUDA block-diagonal kernel (on CPU it falls
    back to one factor), so the kernel is stood in for by torch.block_diag of each factor's blocks, which is what it
    computes; PEFT's own permutations and products do the rest."""
    import peft.tuners.boft.layer as boft_layer

    class BlockDiag:
        @staticmethod
        def apply(blocks):  # [N, D, H, H] -> [N, D·H, D·H]
            return torch.stack([torch.block_diag(*factor) for factor in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", BlockDiag)
    base = tiny_model("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    adapter = make_typed(build_model("llama"), tmp_path / "a", "BOFT", targets, boft_n_butterfly_factor=3)
    name = "base_model.model.model.layers.0.mlp.down_proj.boft_R"
    assert ws.open(adapter).info(name).shape == (3, 24, 4, 4)  # three factors of 24 blocks of 4 (input 96)
    ws.lora.merge(base, [adapter], tmp_path / "m")
    ours, theirs = dict(ws.open(tmp_path / "m")), peft_merged("llama", base, adapter)
    worst, where = max_abs(ours, theirs, list(theirs))
    assert worst <= 1e-6, (where, worst)
    assert sum(not torch.equal(ours[n], ws.open(base)[n]) for n in ours) == 6
    inputs = ids()
    got, want = model_logits("llama", tmp_path / "m", inputs), peft_logits("llama", base, adapter, inputs)
    assert float((got - want).abs().max()) <= 1e-4
    ws.lora.unmerge(tmp_path / "m", adapter, tmp_path / "back")
    assert ws.diff(base, tmp_path / "back").summary["max_abs"] <= 1e-5


def test_unmerge_refuses_an_ia3_zero(tiny_model, tmp_path):
    base = tiny_model("llama")
    adapter = make_typed(build_model("llama"), tmp_path / "a", "IA3", ["k_proj"])
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    tensors[name][3] = 0.0
    save_file(tensors, adapter / "adapter_model.safetensors")
    ws.lora.merge(base, [adapter], tmp_path / "m")
    with pytest.raises(IncompatibleError, match="IA³ vector of 'model.layers.0.self_attn.k_proj' has zeros"):
        ws.lora.unmerge(tmp_path / "m", adapter, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_mixed_types_in_one_fold_are_sums_of_single_folds(tiny_model, tmp_path):
    from _lora_utils import make_adapter

    base_dir = tiny_model("llama")
    lora = make_adapter(build_model("llama"), tmp_path / "lora", r=4, target_modules=["q_proj", "v_proj"])
    ia3 = make_typed(
        build_model("llama"), tmp_path / "ia3", "IA3", ["q_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    oft = make_typed(build_model("llama"), tmp_path / "oft", "OFT", ["v_proj", "o_proj"])
    loha = make_typed(build_model("llama"), tmp_path / "loha", "LOHA", ["q_proj"])
    assert [ws.inspect(x).details["adapter"]["adapted_modules"] for x in (ia3, oft, loha)] == [4, 4, 2]
    weights = {lora: 0.7, ia3: -0.5, oft: 1.3, loha: 0.4}
    folded = ws.lora.open_folded(base_dir, list(weights.items()))
    singles = {a: ws.lora.open_folded(base_dir, [(a, 1.0)]) for a in weights}
    base = ws.open(base_dir)
    touched = 0
    for name in base:
        want = base[name] + sum(w * (singles[a][name] - base[name]) for a, w in weights.items())
        assert float((folded[name] - want).abs().max()) <= 1e-6, name
        touched += int(not torch.equal(folded[name], base[name]))
    assert touched == 2 * 4  # q, v, o, down in two layers
    from weightsmith.cli import main

    args = [str(base_dir), f"{lora}@0.7", f"{ia3}@-0.5", f"{oft}@1.3", f"{loha}@0.4", "-o", str(tmp_path / "cli")]
    assert main(["lora", "merge", *args]) == 0
    assert all(torch.equal(ws.open(tmp_path / "cli")[n], folded[n]) for n in base)


def test_types_that_cannot_fold_say_why(tiny_model, tmp_path):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    base = tiny_model("llama")
    prompt = tmp_path / "prompt"
    get_peft_model(
        build_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).save_pretrained(prompt)
    with pytest.raises(IncompatibleError, match="virtual-token embeddings .* no weight changes"):
        ws.lora.merge(base, [prompt], tmp_path / "o1")
    prefix = tmp_path / "prefix"
    get_peft_model(
        build_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ).save_pretrained(prefix)
    with pytest.raises(IncompatibleError, match="key/value prefixes"):
        ws.lora.merge(base, [prefix], tmp_path / "o2")
    xlora = tmp_path / "xlora"
    xlora.mkdir()
    (xlora / "adapter_config.json").write_text(json.dumps({"peft_type": "XLORA"}))
    save_file(
        {"base_model.model.internal_xlora_classifier.layers.0.weight": torch.zeros(2, 2)},
        xlora / "adapter_model.safetensors",
    )
    with pytest.raises(IncompatibleError, match="gates computed from each input"):
        ws.lora.merge(base, [xlora], tmp_path / "o3")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_typed_fold_imports_neither_transformers_nor_peft(tiny_model, tmp_path):
    import subprocess
    import sys

    adapter = make_typed(build_model("llama"), tmp_path / "a", "OFT", ["q_proj"])
    code = (
        f"import sys, weightsmith as ws; ws.lora.merge({str(tiny_model('llama'))!r}, [{str(adapter)!r}], "
        f"{str(tmp_path / 'm')!r}); bad = [m for m in ('transformers', 'peft') if m in sys.modules]; "
        f"assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_peft_type_is_folded_or_refused_with_its_reason(tiny_model, tmp_path):
    """Each member of PEFT's PeftType is folded, or refused naming the type and why (no weight change, an
    input-dependent mix) or that PEFT can fold what weightsmith does not; nothing is written."""
    from peft import PeftType

    from weightsmith.merge.lora.peft_types import FOLDED, NOT_FOLDABLE, NOT_YET_FOLDED

    names = {t.name for t in PeftType}
    groups = [set(FOLDED), set(NOT_FOLDABLE), set(NOT_YET_FOLDED)]
    assert sum(map(len, groups)) == len(set().union(*groups)), "a type is in two groups"
    assert set().union(*groups) == names, names.symmetric_difference(set().union(*groups))
    base = tiny_model("llama")
    for name in sorted(names - set(FOLDED)):
        adapter = tmp_path / name
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": name}))
        save_file({"base_model.model.model.layers.0.some.weight": torch.ones(2)}, adapter / "adapter_model.safetensors")
        reason = NOT_FOLDABLE.get(name, "PEFT's merge_and_unload can fold it")
        with pytest.raises(IncompatibleError, match=re.escape(f"peft_type {name!r}") + ".*" + re.escape(reason)):
            ws.lora.merge(base, [adapter], tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    assert len(NOT_FOLDABLE) >= 11 and all("weight" in why or "input" in why for why in NOT_FOLDABLE.values())


@pytest.mark.parametrize(
    ("peft_type", "kind", "shape"),
    [
        ("LOKR", "linear", (24, 20)),
        ("LOKR", "conv1d", (20, 24)),
        ("LOKR", "embedding", (20, 24)),
        ("LOKR", "conv", (24, 10, 3, 3)),
        ("LOHA", "linear", (24, 20)),
        ("LOHA", "conv1d", (20, 24)),
    ],
)
def test_row_kernels_equal_the_whole_delta_in_any_blocks(peft_type, kind, shape, monkeypatch):
    """The row-block kernels of LoKr (W1's rows times W2's rows, broadcast) give exactly ΔW built whole as PEFT
    builds it, for blocks that cut W1's row groups anywhere; LoHa's (the block's rows of both products) within
    float32 rounding."""
    from weightsmith.merge.lora import math as lora_math
    from weightsmith.merge.lora.peft_types import Update, row_kernel, update_delta

    g = torch.Generator().manual_seed(0)
    out, fan_in = (shape[1], shape[0]) if kind in ("conv1d", "embedding") else (shape[0], math.prod(shape[1:]))
    if peft_type == "LOKR":  # W1 [4, 2] ⊗ W2 [6, in/2(, 3, 3)]; W2 low rank on linear kinds
        tensors = {"lokr_w1": torch.randn(4, 2, generator=g)}
        if kind == "conv":
            tensors["lokr_w2"] = torch.randn(6, shape[1] // 2, *shape[2:], generator=g)
        else:
            tensors["lokr_w2_a"], tensors["lokr_w2_b"] = torch.randn(6, 3, generator=g), torch.randn(3, 10, generator=g)
    else:
        tensors = {p: torch.randn(s, generator=g) for p, s in (("hada_w1_a", (out, 3)), ("hada_w1_b", (3, fan_in)))}
        tensors |= {p: torch.randn(s, generator=g) for p, s in (("hada_w2_a", (out, 3)), ("hada_w2_b", (3, fan_in)))}
    upd = Update("m", "delta", peft_type, {p: p for p in tensors}, out=out, fan_in=fan_in, scaling=0.7)
    weight = torch.randn(shape, generator=g)
    want = weight + update_delta(upd, tensors, kind, shape)
    for elements in (7 * shape[-1] if len(shape) == 2 else 7 * fan_in, 5 * fan_in, 1):
        monkeypatch.setattr(lora_math, "_BLOCK_ELEMENTS", elements)  # 7, 5 or 1 rows a block
        got = weight.clone().reshape(shape[0], -1)
        lora_math.in_row_blocks_(got, got, row_kernel(upd, tensors, kind, shape))
        if peft_type == "LOHA":  # a block's rows of two matrix products: the BLAS may sum the rank terms in another
            # order for a few rows than for the whole (MKL does for fewer than 4 rows on AVX2), and Conv1D's
            # products of the transposed factors sum them in another order anyway
            torch.testing.assert_close(got.reshape(shape), want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got.reshape(shape), want)
