"""End-to-end pruning: exact sparsity in the written checkpoints, N:M per group, structured models that load in
transformers and equal the masked original, Wanda against an independent hook pass, and Wanda vs magnitude on
the real MiniLM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers as tf
from _loading import load_checked
from _prune_utils import CALIBRATION, mask_units_, with_tokenizer, write_lines
from conftest import SENTENCES, VOCAB, embed

import weightsmith as ws
from weightsmith.compress.prune import DEFAULT_SKIP, masks

PRUNED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pruned_names(ckpt):
    return [n for n in ckpt if n.endswith(".weight") and any(p in n for p in PRUNED)]


def test_magnitude_layer_exact_per_tensor_and_skips(tiny_model, tmp_path):
    src = ws.open(tiny_model("llama"))
    report = ws.prune(src.path, tmp_path / "out", sparsity=0.37)
    out = ws.open(tmp_path / "out")
    for name in src:
        a, b = src[name], out[name]
        if name in _pruned_names(src):
            assert int((b == 0).sum()) == round(0.37 * a.numel()), name
            kept = b != 0
            assert torch.equal(b[kept], a[kept]) and a[~kept].abs().max() <= a[kept].abs().min()
        else:  # embeddings, norms, lm_head: untouched
            assert torch.equal(a, b), name
    assert report.summary["params_before"] == report.summary["params_after"]
    assert report.summary["nonzero_after"] == sum(int(torch.count_nonzero(out[n])) for n in out)


def test_magnitude_global_exact_overall_one_threshold(tiny_model, tmp_path):
    src = ws.open(tiny_model("qwen2"))
    ws.prune(src.path, tmp_path / "out", sparsity=0.5, scope="global")
    out = ws.open(tmp_path / "out")
    names = _pruned_names(src)
    total = sum(src[n].numel() for n in names)
    assert sum(int((out[n] == 0).sum()) for n in names) == round(0.5 * total)
    dropped = torch.cat([src[n][out[n] == 0].abs() for n in names])
    kept = torch.cat([src[n][out[n] != 0].abs() for n in names])
    assert dropped.max() <= kept.min()
    per_tensor = {round(float((out[n] == 0).float().mean()), 3) for n in names}
    assert len(per_tensor) > 1  # one global threshold, not the same sparsity everywhere


def test_global_bf16_and_gpt2_conv1d_24(tiny_model, tmp_path):
    src = ws.open(tiny_model("gpt2", dtype="bfloat16"))
    ws.prune(src.path, tmp_path / "g", sparsity=0.4, scope="global")
    out = ws.open(tmp_path / "g")
    names = [n for n in src if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert sum(int((out[n] == 0).sum()) for n in names) == round(0.4 * sum(src[n].numel() for n in names))
    ws.prune(src.path, tmp_path / "p", pattern="2:4")
    out = ws.open(tmp_path / "p")
    for n in names:  # Conv1D is [in, out]: the groups run along dim 0
        groups = (out[n].t() != 0).reshape(out[n].shape[1], -1, 4).sum(-1)
        assert bool((groups == 2).all()), n


def test_24_pattern_every_group_and_loads(tiny_model, tmp_path):
    src = ws.open(tiny_model("llama"))
    ws.prune(src.path, tmp_path / "out", pattern="2:4")
    out = ws.open(tmp_path / "out")
    for n in _pruned_names(src):
        w, orig = out[n], src[n]
        groups = (w != 0).reshape(w.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), n
        og = orig.abs().reshape(w.shape[0], -1, 4)
        kept_min = torch.where(groups, og, torch.inf).amin(-1)
        dropped_max = torch.where(~groups, og, -torch.inf).amax(-1)
        assert bool((dropped_max <= kept_min).all()), n
    model = load_checked(tf.AutoModelForCausalLM, tmp_path / "out")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, out["model.layers.0.mlp.up_proj.weight"])


def test_magnitude_streams_without_transformers(tiny_model, tmp_path):
    code = (
        "import sys, weightsmith as ws; "
        f"ws.prune({str(tiny_model('llama'))!r}, {str(tmp_path / 'o')!r}, sparsity=0.5, scope='global'); "
        "bad = [m for m in ('transformers', 'peft', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _hook_norms(model, ids_list):
    """Reference ‖X_j‖ of every Linear from one plain dense pass (written independently of wanda.py)."""
    sums, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):

            def hook(_m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x**2).sum(0)

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in ids_list:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


def test_wanda_first_block_matches_reference_and_rows_exact(tiny_model, tmp_path):
    src = with_tokenizer(tiny_model("llama"), tmp_path / "llama-tok")
    calib = write_lines(tmp_path / "calib.txt", CALIBRATION)
    report = ws.prune(src, tmp_path / "out", method="wanda", sparsity=0.5, calibration=calib, seq_len=32)
    out, orig = ws.open(tmp_path / "out"), ws.open(src)
    tok = tf.AutoTokenizer.from_pretrained(src)
    ids = [tok(t, return_tensors="pt")["input_ids"][:, :32] for t in CALIBRATION]
    norms = _hook_norms(tf.AutoModelForCausalLM.from_pretrained(src).eval(), ids)
    for n in _pruned_names(orig):
        w = out[n]
        assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), n  # exactly half of every output row
        if ".layers.0.self_attn." in n or ".layers.0.mlp.gate" in n or ".layers.0.mlp.up" in n:
            # block 0's inputs do not depend on any pruning: the mask must be Wanda's on the dense norms
            expected = orig[n] * masks.wanda_mask(orig[n], norms[n.removesuffix(".weight")], 0.5)
            assert torch.equal(w, expected), n
    assert report.summary["method"] == "wanda"


def test_eval_data_perplexity_against_transformers_loss(tiny_model, tmp_path):
    src = with_tokenizer(tiny_model("llama"), tmp_path / "llama-tok")
    held = write_lines(tmp_path / "held.txt", SENTENCES[:6])
    report = ws.prune(src, tmp_path / "out", sparsity=0.5, eval_data=held)
    q = report.details["quality"]
    tok = tf.AutoTokenizer.from_pretrained(src)
    for key, path in (("before", src), ("after", tmp_path / "out")):
        model = tf.AutoModelForCausalLM.from_pretrained(path).eval()
        nll = count = 0.0
        with torch.no_grad():
            for text in SENTENCES[:6]:
                ids = tok(text, return_tensors="pt")["input_ids"]
                nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
        assert q[key] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
    assert q["after"] != q["before"]  # a random toy need not get worse, but it must change


# -- structured ------------------------------------------------------------------------------------------------

LLAMA_NAMES = {"ffn": "model.layers.{i}.mlp.down_proj.weight", "heads": "model.layers.{i}.self_attn.o_proj.weight"}
BERT_NAMES = {"ffn": "encoder.layer.{i}.output.dense.weight"}


@pytest.mark.parametrize(
    "kind,structured,option",
    [
        ("llama", "ffn", {"ratio": 0.25}),
        ("llama", "heads", {"keep_heads": 2}),
        ("qwen2", "ffn", {"ratio": 0.5}),
        ("qwen2", "heads", {"ratio": 0.5}),
        ("mistral", "heads", {"keep_heads": 2}),
        ("bert", "ffn", {"ratio": 0.25}),
    ],
)
def test_structured_equals_masked_original(tiny_model, tmp_path, kind, structured, option):
    src = tiny_model(kind)
    report = ws.prune(src, tmp_path / "out", structured=structured, **option)
    auto = tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM
    small = load_checked(auto, tmp_path / "out").eval()
    ref = auto.from_pretrained(src).eval()
    cfg = ref.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    units = cfg.intermediate_size if structured == "ffn" else cfg.num_attention_heads
    mask_units_(ref, structured, report.details["kept"], BERT_NAMES if kind == "bert" else LLAMA_NAMES, units, head_dim)
    n_params = sum(p.numel() for p in small.parameters())
    assert report.summary["params_after"] == n_params < sum(p.numel() for p in ref.parameters())
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kind == "bert":
            a, b = small(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
        else:
            a, b = small(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    if structured == "heads":
        assert small.config.num_attention_heads == report.summary["units_after"] and small.config.head_dim == head_dim


def test_structured_gqa_whole_groups(tmp_path):
    config = tf.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=96,
        head_dim=16,
        sliding_window=None,
    )
    torch.manual_seed(0)
    tf.MistralForCausalLM(config).save_pretrained(tmp_path / "src")
    report = ws.prune(tmp_path / "src", tmp_path / "out", structured="heads", keep_heads=6)  # 6 % 4: drop a group
    small = load_checked(tf.AutoModelForCausalLM, tmp_path / "out").eval()
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (6, 3)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    mask_units_(ref, "heads", report.details["kept"], LLAMA_NAMES, 8, 16)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (small(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-5


# -- the real MiniLM -------------------------------------------------------------------------------------------


def test_minilm_structured_ffn_with_calibration(minilm_path, tmp_path):
    calib = write_lines(tmp_path / "calib.txt", CALIBRATION)
    report = ws.prune(minilm_path, tmp_path / "out", structured="ffn", ratio=0.5, calibration=calib, samples=8)
    assert report.summary["scored_by"] == "activations"
    small = load_checked(tf.AutoModel, tmp_path / "out").eval()
    ref = tf.AutoModel.from_pretrained(minilm_path).eval()
    mask_units_(ref, "ffn", report.details["kept"], BERT_NAMES, 1536, 32)
    assert small.config.intermediate_size == 768
    assert report.summary["params_after"] == sum(p.numel() for p in small.parameters())
    a, b = embed(small, SENTENCES[:8], tokenizer_dir=minilm_path), embed(ref, SENTENCES[:8], tokenizer_dir=minilm_path)
    assert (a - b).abs().max().item() <= 1e-5


def test_minilm_wanda_beats_magnitude_on_held_out(minilm_path, tmp_path):
    calib = write_lines(tmp_path / "calib.txt", CALIBRATION)
    ws.prune(minilm_path, tmp_path / "wanda", method="wanda", sparsity=0.5, calibration=calib, samples=8)
    ws.prune(minilm_path, tmp_path / "mag", sparsity=0.5)
    dense = embed(minilm_path)  # conftest.SENTENCES: none of them was used for calibration
    cos_w = (embed(tmp_path / "wanda", tokenizer_dir=minilm_path) * dense).sum(-1).mean().item()
    cos_m = (embed(tmp_path / "mag", tokenizer_dir=minilm_path) * dense).sum(-1).mean().item()
    assert cos_w > cos_m, (cos_w, cos_m)
    assert not set(CALIBRATION) & set(SENTENCES)


def test_default_skip_covers_the_usual_suspects():
    import re

    skipped = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "transformer.wte.weight",
        "embeddings.LayerNorm.weight",
        "pooler.dense.weight",
        "classifier.weight",
        "transformer.h.0.ln_1.weight",
    ]
    kept = [
        "model.layers.0.self_attn.q_proj.weight",
        "encoder.layer.0.output.dense.weight",
        "transformer.h.0.attn.c_attn.weight",
    ]
    hit = lambda n: any(re.search(p, n) for p in DEFAULT_SKIP)  # noqa: E731
    assert all(hit(n) for n in skipped) and not any(hit(n) for n in kept)


def test_wanda_gpt2_conv1d_rows_and_24(tiny_model, tmp_path):
    src = with_tokenizer(tiny_model("gpt2"), tmp_path / "gpt2-tok")
    calib = write_lines(tmp_path / "calib.txt", CALIBRATION)
    ws.prune(src, tmp_path / "u", method="wanda", sparsity=0.25, calibration=calib, samples=4)
    ws.prune(src, tmp_path / "p", method="wanda", pattern="2:4", calibration=calib, samples=4)
    u, p = ws.open(tmp_path / "u"), ws.open(tmp_path / "p")
    for n in [n for n in u if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]:
        rows = u[n].t()  # Conv1D [in, out] → output rows
        assert bool(((rows == 0).sum(1) == rows.shape[1] // 4).all()), n
        groups = (p[n].t() != 0).reshape(rows.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), n
    load_checked(tf.AutoModelForCausalLM, tmp_path / "p")  # loads


def test_structured_heads_scored_by_activations(tiny_model, tmp_path):
    src = with_tokenizer(tiny_model("qwen2"), tmp_path / "qwen-tok")
    calib = write_lines(tmp_path / "calib.txt", CALIBRATION)
    report = ws.prune(src, tmp_path / "out", structured="heads", keep_heads=2, calibration=calib, samples=4)
    assert report.summary["scored_by"] == "activations"
    small = load_checked(tf.AutoModelForCausalLM, tmp_path / "out").eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    mask_units_(ref, "heads", report.details["kept"], LLAMA_NAMES, 4, 16)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (small(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-5
