"""LoRA fold parity with PEFT itself: adapters made by PEFT (non-zero B, every trainable tensor perturbed), folded
by weightsmith, compared with ``merge_and_unload()`` tensor by tensor and with the unmerged PEFT model's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from _lora_utils import ids, load, make_adapter, max_abs, model_logits, peft_logits, peft_merged
from conftest import build_model, embed
from safetensors.torch import load_file, save_file

import weightsmith as ws

warnings.filterwarnings("ignore", module="peft")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # GQA llama, every linear and the embedding, PEFT regex rank/alpha patterns
    "llama_patterns": (
        "llama",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": [*ALL_LINEAR, "embed_tokens"],
            "rank_pattern": {"q_proj": 2, r"layers\.1\..*v_proj": 6},
            "alpha_pattern": {"down_proj": 3, "layers.0.self_attn.o_proj": 32},
        },
    ),
    "llama_rslora": ("llama", {"r": 8, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True}),
    "llama_dora": (
        "llama",
        {"r": 4, "lora_alpha": 8, "target_modules": [*ALL_LINEAR, "embed_tokens"], "use_dora": True},
    ),
    "gpt2_conv1d_lora_bias": (
        "gpt2",
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "lora_bias": True},
    ),
    "gpt2_dora_embedding": (
        "gpt2",
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "wte"], "use_dora": True},
    ),
    "bert_cls_bias_all": (
        "bert_cls",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["query", "value", "dense"],
            "bias": "all",
            "modules_to_save": ["classifier"],
        },
    ),
    "qwen2": ("qwen2", {"r": 4, "lora_alpha": 16, "target_modules": "all-linear", "modules_to_save": ["lm_head"]}),
    "llama_tied_embedding": ("llama_tied", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fold_matches_peft(case, tiny_model, tmp_path):
    kind, lora = CASES[case]
    base = tiny_model(kind)
    adapter = make_adapter(build_model(kind), tmp_path / "adapter", **lora)
    report = ws.lora.merge(base, [adapter], tmp_path / "merged")
    ours = dict(ws.open(tmp_path / "merged"))
    theirs = peft_merged(kind, base, adapter)
    untied = report.summary["untied"] or []
    # PEFT folds a tied embedding in place, so its head silently changes too; the unmerged model (checked below)
    # is the reference for those heads.
    names = [n for n in theirs if n not in untied and n in ours]
    assert set(theirs) - set(untied) - set(names) <= set(ws.open(base).tied_weights)
    worst, where = max_abs(ours, theirs, names)
    assert worst <= 1e-6, (where, worst)
    assert report.summary["changed"] > 0
    assert any(not torch.equal(ours[n], ws.open(base)[n]) for n in names), "the adapter changed nothing"
    inputs = ids()
    got = model_logits(kind, tmp_path / "merged", inputs)  # from_pretrained loads what we wrote
    want = peft_logits(kind, base, adapter, inputs)
    assert float((got - want).abs().max()) <= 1e-4


def test_tied_embedding_untied_when_fold_makes_them_differ(tiny_model, tmp_path):
    base = tiny_model("llama_tied")
    adapter = make_adapter(build_model("llama_tied"), tmp_path / "a", r=4, target_modules=["embed_tokens"])
    ws.lora.merge(base, [adapter], tmp_path / "m")
    out = ws.open(tmp_path / "m")
    assert out.config["tie_word_embeddings"] is False
    assert torch.equal(out["lm_head.weight"], ws.open(base)["model.embed_tokens.weight"])
    assert not torch.equal(out["model.embed_tokens.weight"], out["lm_head.weight"])
    # untouched tied models stay tied
    other = make_adapter(build_model("llama_tied"), tmp_path / "b", r=4, target_modules=["q_proj"])
    ws.lora.merge(base, [other], tmp_path / "m2")
    assert "lm_head.weight" not in ws.open(tmp_path / "m2")
    assert ws.open(tmp_path / "m2").config.get("tie_word_embeddings", True) is True


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_bf16_base_matches_peft_bits(adapter_dtype, tiny_model, tmp_path):
    base = tiny_model("llama", dtype="bfloat16")
    model = build_model("llama").to(getattr(torch, adapter_dtype))
    adapter = make_adapter(
        model, tmp_path / "a", r=4, lora_alpha=8, target_modules="all-linear", autocast_adapter_dtype=False
    )
    ws.lora.merge(base, [adapter], tmp_path / "m")
    ours = dict(ws.open(tmp_path / "m"))
    theirs = peft_merged("llama", base, adapter, dtype=torch.bfloat16)
    assert all(ours[n].dtype == torch.bfloat16 for n in ours)
    changed = 0
    for name, t in theirs.items():
        a, b = ours[name].view(torch.int16).int(), t.view(torch.int16).int()
        assert int((a - b).abs().max()) <= 1, name  # bit-identical or one ulp (same sign, adjacent patterns)
        changed += int(not torch.equal(ours[name], ws.open(base)[name]))
        assert torch.equal(ours[name], t), name  # PEFT loads adapters in fp32 and rounds once, as we do
    assert changed >= 14


def test_conv2d_and_conv_dora_match_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 6, 1),
            torch.nn.Flatten(),
            torch.nn.Linear(6 * 6 * 6, 5),
        ).eval()

    save_file({k: v.contiguous() for k, v in net().state_dict().items()}, tmp_path / "base.safetensors")
    x = torch.randn(2, 3, 8, 8)
    for use_dora in (False, True):
        cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2", "4"], use_dora=use_dora, init_lora_weights=False)
        peft_model = get_peft_model(net(), cfg)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        with torch.no_grad():
            want_out = peft_model(x)
        adapter = tmp_path / f"conv{use_dora}"
        peft_model.save_pretrained(adapter)
        ws.lora.merge(tmp_path / "base.safetensors", [adapter], tmp_path / f"m{use_dora}")
        ours = dict(ws.open(tmp_path / f"m{use_dora}"))
        theirs = PeftModel.from_pretrained(net(), adapter).merge_and_unload().state_dict()
        worst, where = max_abs(ours, theirs)
        assert worst <= 1e-6, (where, worst)
        assert not torch.equal(ours["0.weight"], net().state_dict()["0.weight"])
        plain = net()
        plain.load_state_dict(ours)
        with torch.no_grad():
            assert float((plain(x) - want_out).abs().max()) <= 1e-5


def test_bin_adapter_folds_like_safetensors(tiny_model, tmp_path):
    base = tiny_model("qwen2")
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "seed": 3}
    st = make_adapter(build_model("qwen2"), tmp_path / "st", **kw)
    binary = make_adapter(build_model("qwen2"), tmp_path / "bin", safe_serialization=False, **kw)
    assert (binary / "adapter_model.bin").is_file() and not (binary / "adapter_model.safetensors").exists()
    ws.lora.merge(base, [st], tmp_path / "m1")
    ws.lora.merge(base, [binary], tmp_path / "m2")
    assert ws.diff(tmp_path / "m1", tmp_path / "m2").summary["max_abs"] == 0.0
    worst, _ = max_abs(dict(ws.open(tmp_path / "m2")), peft_merged("qwen2", base, binary))
    assert worst <= 1e-6


def test_output_dtype_is_one_rounding_of_the_float32_fold(tiny_model, tmp_path):
    """--dtype rounds the float32 fold once: bf16 output == fp32 fold rounded; a bf16 base folded into fp32 output ==
    the fold of that base first widened to fp32 (different paths through the fold: cast out, cast in, in place)."""
    adapter = make_adapter(build_model("llama"), tmp_path / "a", r=4, target_modules="all-linear", seed=5)
    ws.lora.merge(tiny_model("llama"), [adapter], tmp_path / "f32")
    ws.lora.merge(tiny_model("llama"), [adapter], tmp_path / "to_bf16", dtype="bf16")
    f32, to_bf16 = ws.open(tmp_path / "f32"), ws.open(tmp_path / "to_bf16")
    assert all(torch.equal(to_bf16[n], f32[n].to(torch.bfloat16)) for n in f32)
    bf16_base = tiny_model("llama", dtype="bfloat16")
    ws.convert(bf16_base, tmp_path / "widened", dtype="fp32")
    ws.lora.merge(bf16_base, [adapter], tmp_path / "from_bf16", dtype="fp32")
    ws.lora.merge(tmp_path / "widened", [adapter], tmp_path / "from_widened")
    assert ws.diff(tmp_path / "from_bf16", tmp_path / "from_widened").summary["max_abs"] == 0.0
    assert ws.diff(tmp_path / "from_bf16", tmp_path / "widened").summary["max_abs"] > 0  # the fold did change it


def test_weighted_folds_are_sums_of_single_folds(tiny_model, tmp_path):
    base_dir = tiny_model("llama")
    a1 = make_adapter(build_model("llama"), tmp_path / "a1", r=4, target_modules=["q_proj", "v_proj"], seed=1)
    a2 = make_adapter(
        build_model("llama"), tmp_path / "a2", r=2, target_modules=["v_proj", "down_proj"], seed=2, use_dora=True
    )
    folded = ws.lora.open_folded(base_dir, [(a1, 0.7), (a2, -0.3)])
    one = ws.lora.open_folded(base_dir, [(a1, 1.0)])
    two = ws.lora.open_folded(base_dir, [(a2, 1.0)])
    base = ws.open(base_dir)
    checked = 0
    for name in base:
        want = base[name] + 0.7 * (one[name] - base[name]) - 0.3 * (two[name] - base[name])
        assert float((folded[name] - want).abs().max()) <= 1e-6, name
        checked += int(not torch.equal(one[name], base[name]) or not torch.equal(two[name], base[name]))
    assert checked == 6  # q, v, down in two layers
    # two plain adapters at weight 1 equal PEFT merging both (through the CLI with ADAPTER@WEIGHT)
    from weightsmith.cli import main

    b1 = make_adapter(build_model("llama"), tmp_path / "b1", r=4, target_modules=["q_proj", "v_proj"], seed=4)
    assert main(["lora", "merge", str(base_dir), f"{a1}@1", str(b1), "-o", str(tmp_path / "both")]) == 0
    worst, where = max_abs(dict(ws.open(tmp_path / "both")), peft_merged("llama", base_dir, [a1, b1]))
    assert worst <= 1e-6, (where, worst)


def test_minilm_lora_folds_loads_and_matches_peft(minilm_path, tmp_path):
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModel.from_pretrained(minilm_path).eval()
    adapter = make_adapter(
        model, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], scale=0.02
    )
    report = ws.lora.merge(minilm_path, [adapter], tmp_path / "merged")
    # 6 layers × (q, k, v, attention out, intermediate, output dense) + the pooler's dense
    assert report.summary["lora"] == 6 * 6 + 1
    assert (tmp_path / "merged" / "tokenizer.json").exists() or (tmp_path / "merged" / "vocab.txt").exists()
    peft_model = PeftModel.from_pretrained(tf.AutoModel.from_pretrained(minilm_path).eval(), adapter).eval()
    want = embed(peft_model, tokenizer_dir=minilm_path)
    got = embed(tmp_path / "merged")
    assert float((got - want).abs().max()) <= 1e-5
    assert float((got - embed(minilm_path)).abs().max()) > 1e-3  # the adapter really changed the model
    ours, theirs = dict(ws.open(tmp_path / "merged")), peft_model.merge_and_unload().state_dict()
    assert set(theirs) <= set(ours)  # ours also keeps the stored position_ids buffer
    worst, where = max_abs(ours, theirs, list(theirs))
    assert worst <= 1e-6, (where, worst)


def test_unmerge_inverts_plain_lora(tiny_model, tmp_path):
    base = tiny_model("gpt2")
    adapter = make_adapter(build_model("gpt2"), tmp_path / "a", r=4, target_modules=["c_attn", "c_fc"], lora_bias=True)
    ws.lora.merge(base, [(adapter, 0.5)], tmp_path / "m")
    assert ws.diff(base, tmp_path / "m").summary["differ"] == 8  # 2 layers × (c_attn, c_fc) × (weight, bias)
    ws.lora.unmerge(tmp_path / "m", (adapter, 0.5), tmp_path / "back")
    assert ws.diff(base, tmp_path / "back").summary["max_abs"] <= 1e-6


def test_fold_imports_neither_transformers_nor_peft(tiny_model, tmp_path):
    base = tiny_model("llama")
    adapter = make_adapter(build_model("llama"), tmp_path / "a", r=2, target_modules=["q_proj"])
    code = (
        f"import sys, weightsmith as ws; ws.lora.merge({str(base)!r}, [{str(adapter)!r}], "
        f"{str(tmp_path / 'm')!r}); bad = [m for m in ('transformers', 'peft') if m in sys.modules]; "
        f"assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inspect_describes_adapter(tmp_path):
    adapter = make_adapter(
        build_model("llama"),
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        use_dora=True,
        use_rslora=True,
    )
    info = ws.inspect(adapter).details["adapter"]
    assert info["peft_type"] == "LORA" and info["r"] == 4 and info["lora_alpha"] == 8
    assert {"dora", "rslora"} <= set(info["variants"]) and info["target_modules"] == ["q_proj"]


def test_extract_reproduces_a_rank_r_finetune(tiny_model, tmp_path):
    base = ws.open(tiny_model("llama"))
    gen = torch.Generator().manual_seed(5)
    tuned = {}
    for name in base:
        t = base[name]
        if name.endswith("proj.weight"):  # an exact rank-3 update
            t = t + torch.randn(t.shape[0], 3, generator=gen) @ torch.randn(3, t.shape[1], generator=gen) * 0.05
        tuned[name] = t
    ws.save(tuned, tmp_path / "tuned", config=base.config)
    report = ws.lora.extract(base, tmp_path / "tuned", tmp_path / "adapter", rank=3)
    assert report.summary["lora_modules"] == 14 and not report.summary["modules_to_save"]
    ws.lora.merge(base, [tmp_path / "adapter"], tmp_path / "refolded")
    diff = ws.diff(tmp_path / "tuned", tmp_path / "refolded")
    assert diff.summary["max_abs"] <= 1e-5 and diff.summary["compared"] == len(base)


def test_extract_full_finetune_to_reported_energy(tiny_model, tmp_path):
    from peft import PeftModel

    for kind in ("qwen2", "gpt2"):
        base = tiny_model(kind)
        tuned_model = build_model(kind)
        with torch.no_grad():
            for p in tuned_model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        tuned_model.save_pretrained(tmp_path / f"tuned-{kind}")
        tuned = ws.open(tmp_path / f"tuned-{kind}")
        report = ws.lora.extract(base, tuned, tmp_path / f"ad-{kind}", energy=0.9)
        ws.lora.merge(base, [tmp_path / f"ad-{kind}"], tmp_path / f"re-{kind}")
        refolded, b = ws.open(tmp_path / f"re-{kind}"), ws.open(base)
        for row in report.tensors:  # the kept energy is what the refolded weights really recover
            name = row["module"] + ".weight"
            delta = (tuned[name] - b[name]).double()
            lost = float(((refolded[name] - tuned[name]).double().norm() / delta.norm()) ** 2)
            assert row["energy_kept"] >= 0.9 and abs(lost - (1 - row["energy_kept"])) <= 1e-4, name
        saved = json.loads((tmp_path / f"ad-{kind}" / "adapter_config.json").read_text())["modules_to_save"]
        assert saved and all(
            torch.equal(refolded[n], tuned[n]) for n in tuned if n.rsplit(".", 1)[0] in saved or n.endswith(".bias")
        )
        peft_model = PeftModel.from_pretrained(load(kind, base), tmp_path / f"ad-{kind}").eval()
        with torch.no_grad():
            want = peft_model(**ids()).logits
        assert float((model_logits(kind, tmp_path / f"re-{kind}", ids()) - want).abs().max()) <= 1e-4


def test_adapter_tensors_read_lazily(tiny_model, tmp_path):
    adapter = make_adapter(build_model("llama"), tmp_path / "a", r=2, target_modules=["q_proj"])
    folded = ws.lora.open_folded(tiny_model("llama"), [(adapter, 1.0)])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert folded.info(name).shape == (64, 64) and len(folded) == len(ws.open(tiny_model("llama")))
    sd = load_file(adapter / "adapter_model.safetensors")
    a = sd[f"base_model.model.{name[:-7]}.lora_A.weight"]
    b = sd[f"base_model.model.{name[:-7]}.lora_B.weight"]
    want = ws.open(tiny_model("llama"))[name] + (8 / 2) * b @ a  # PEFT's default lora_alpha is 8
    assert float((folded[name] - want).abs().max()) <= 1e-6


def test_unmerge_embedding_adapter_and_sharded_base(tiny_model, tmp_path):
    sharded = tiny_model("llama", shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    adapter = make_adapter(build_model("llama"), tmp_path / "a", r=4, target_modules=["embed_tokens", "o_proj"])
    ws.lora.merge(sharded, [adapter], tmp_path / "m_sharded")
    ws.lora.merge(tiny_model("llama"), [adapter], tmp_path / "m")
    assert ws.diff(tmp_path / "m", tmp_path / "m_sharded").summary["max_abs"] == 0.0
    assert ws.diff(tiny_model("llama"), tmp_path / "m").summary["differ"] == 3  # embedding + 2 o_proj
    # the adapter's saved embedding base_layer copy is not a replacement to undo: only s·B·A is subtracted
    ws.lora.unmerge(tmp_path / "m_sharded", adapter, tmp_path / "back")
    assert ws.diff(tiny_model("llama"), tmp_path / "back").summary["max_abs"] <= 1e-6
