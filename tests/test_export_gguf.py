"""export gguf: files that transformers' GGUF loader (the gguf-py reader + its tensor processors) loads with the
weights gguf-py dequantises from our bytes; the tokenizer round-trips; and GGUF as an input of every streaming verb."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _tokenizers import byte_level_tokenizer
from conftest import SENTENCES

import weightsmith as ws
from weightsmith.checkpoint.gguf_file import permute_qk, unpermute_qk
from weightsmith.errors import DestinationError, IncompatibleError

gguf = pytest.importorskip("gguf")
tf = pytest.importorskip("transformers")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]  # those transformers loads from GGUF


def _load_gguf(path: Path):
    """transformers' own GGUF load of ``path``, from a directory holding nothing else (no config.json to lean on)."""
    alone = path.parent / f"{path.stem}-alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(path, alone / path.name)
    model, info = tf.AutoModelForCausalLM.from_pretrained(
        alone, gguf_file=path.name, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def _dequantised(path: Path) -> dict[str, np.ndarray]:
    """gguf-py's own reading of every tensor (GGUF names, stored order: q/k still permuted, Gemma norms + 1)."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_transformers_loads_what_we_write(tiny_model, tmp_path, kind, qtype):
    src = tiny_model(kind)
    out = tmp_path / f"{kind}-{qtype}.gguf"
    report = ws.export.gguf(src, out, type=qtype)
    assert out.is_file() and report.summary["type"] == qtype
    float_model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    loaded, info = _load_gguf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # weights: what transformers loaded is what gguf-py dequantises from our bytes, mapped back by our reader
    ours = ws.open(out)
    loaded_sd = loaded.state_dict()
    for name in ours:
        assert torch.equal(ours[name].float(), loaded_sd[name].float()), name
    # and close to the float model: Q8_0's per-block error ≈ 0.5%, F16's ≈ 0.05%
    tol = {"f16": 1e-3, "q8_0": 1e-2}[qtype]
    for name, w in float_model.state_dict().items():
        if name in ours:
            err = float(torch.linalg.vector_norm(ours[name].float() - w) / (torch.linalg.vector_norm(w) + 1e-12))
            assert err < tol, (name, err)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = float_model(ids).logits, loaded(ids).logits
    assert float((a - b).abs().max()) < {"f16": 1e-3, "q8_0": 5e-2}[qtype] * float(a.abs().max())


def test_stored_bytes_are_gguf_py_quantisation(tiny_model, tmp_path):
    """The bytes in the file are gguf-py's ``quantize`` of the (permuted) weight: nothing of our own in between."""
    src = tiny_model("llama")
    out = tmp_path / "q.gguf"
    ws.export.gguf(src, out, type="q4_0")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    ckpt = ws.open(src)
    q = ckpt["model.layers.1.self_attn.q_proj.weight"]
    expect = gguf.quantize(permute_qk(q, 4).numpy(), gguf.GGMLQuantizationType.Q4_0)
    stored = tensors["blk.1.attn_q.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert np.array_equal(np.asarray(stored.data).reshape(-1), expect.reshape(-1))
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32


@pytest.mark.parametrize("qtype", ["f32", "bf16", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_type_reads_back_as_gguf_py_dequantises(tiny_model, tmp_path, qtype):
    src = tiny_model("qwen2")
    out = tmp_path / f"m-{qtype}.gguf"
    ws.export.gguf(src, out, type=qtype)
    back = ws.open(out)
    raw = _dequantised(out)
    assert torch.equal(back["model.layers.0.mlp.up_proj.weight"].float(), torch.from_numpy(raw["blk.0.ffn_up.weight"]))
    if qtype == "f32":  # exact round trip: every tensor, names and shapes
        orig = ws.open(src)
        assert set(back) == set(orig)
        for name in orig:
            assert torch.equal(back[name], orig[name]), name


def test_permutation_inverts():
    w = torch.randn(64, 8)
    p = permute_qk(w, 4)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_qk(p, 4), w)
    # llama.cpp pairs adjacent rows: head 0's rows 0 and 8 (rotate_half partners for d = 16) become rows 0 and 1
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[8])


def test_gemma_norms_are_stored_plus_one(tiny_model, tmp_path):
    src = tiny_model("gemma")
    out = tmp_path / "g.gguf"
    ws.export.gguf(src, out, type="f32")
    raw = _dequantised(out)
    orig = ws.open(src)
    assert np.allclose(raw["blk.0.attn_norm.weight"], orig["model.layers.0.input_layernorm.weight"].numpy() + 1)
    back = ws.open(out)
    assert back.config["model_type"] == "gemma" and "output.weight" not in raw  # tied head: not written
    torch.testing.assert_close(back["model.norm.weight"], orig["model.norm.weight"], atol=1e-7, rtol=0)


def test_tokenizer_round_trips(tmp_path):
    src = tmp_path / "llama-tok"
    tok = byte_level_tokenizer(src)
    config, cls = tf.LlamaConfig, tf.LlamaForCausalLM
    model = cls(
        config(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    model.save_pretrained(src)
    out = tmp_path / "tok.gguf"
    report = ws.export.gguf(src, out, type="q8_0")
    assert report.summary["tokenizer"].startswith("gpt2") and report.summary["chat_template"]
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.bos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert "<|begin|>" in reader.fields["tokenizer.chat_template"].contents()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out, alone / out.name)
    back = tf.AutoTokenizer.from_pretrained(alone, gguf_file=out.name)
    for text in [*SENTENCES[:8], "Unseen wörds — and ünïcode ✓"]:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    # GGUF in: convert rebuilds the tokenizer files beside the weights
    ws.convert(out, tmp_path / "back")
    rebuilt = tf.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert rebuilt(SENTENCES[3])["input_ids"] == tok(SENTENCES[3])["input_ids"]
    assert rebuilt.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


# how each kind of byte-level BPE splits text before merging, and the name llama.cpp (and transformers' GGUF loader,
# which splits the same way on reading) knows that split by
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPLITS = {"gpt-2": None, "llama-bpe": LLAMA3_SPLIT, "qwen2": LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")}
NUMBERS = [f"In {y} we counted {n} tokens, {n + 1} in all." for y, n in zip(range(1990, 2030), range(1200, 9999, 97))]


def _byte_level_with_split(directory: Path, split: str | None):
    """A byte-level BPE trained on sentences with numbers: GPT-2's built-in split when ``split`` is None (so merges
    span whole numbers with their leading space), else a Split regex step before a regex-less ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if split is None:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin|>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*SENTENCES, *NUMBERS], trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")
    fast.save_pretrained(directory)
    return fast


@pytest.mark.parametrize("pre", list(SPLITS))
def test_pre_tokenizer_named_from_the_tokenizers_split(tmp_path, pre):
    # a Llama whichever the split: the name comes from tokenizer.json, and a reader that splits text by it (llama.cpp,
    # transformers' GGUF tokenizer) encodes numbers as the source tokenizer does
    src = tmp_path / "src"
    tok = _byte_level_with_split(src, SPLITS[pre])
    config = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96
    )
    tf.LlamaForCausalLM(config).save_pretrained(src)
    out = tmp_path / "alone" / "tok.gguf"
    out.parent.mkdir()
    ws.export.gguf(src, out, type="f16")
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    back = tf.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in ["In 2024 we counted 12345 tokens.", "Call 1234567 or 42, it's 1990's!", SENTENCES[0]]:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def _sentencepiece_style_tokenizer(directory: Path):
    """A BPE tokenizer with byte fallback and ▁ word marks (the Llama 2 / Mistral / Gemma kind)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    tok.train_from_iterator(SENTENCES, trainer)
    fast = tf.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def test_sentencepiece_style_vocabulary_round_trips(tmp_path):
    src = tmp_path / "spm"
    tok = _sentencepiece_style_tokenizer(src)
    config = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96
    )
    tf.LlamaForCausalLM(config).save_pretrained(src)
    out = tmp_path / "spm.gguf"
    assert ws.export.gguf(src, out, type="f16").summary["tokenizer"] == "llama (400 tokens)"
    reader = gguf.GGUFReader(out)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN
    assert scores[300] > scores[301]  # earlier pieces merge first
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out, alone / out.name)
    back = tf.AutoTokenizer.from_pretrained(alone, gguf_file=out.name)
    for text in [*SENTENCES[:8], "Unseen wörds ✓"]:  # ö and ✓ are not in the vocabulary: byte fallback
        assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_refuses_architectures_llama_cpp_does_not_know(tiny_model, tmp_path):
    with pytest.raises(IncompatibleError, match=r"architecture 'bert' .* no GGUF mapping"):
        ws.export.gguf(tiny_model("bert"), tmp_path / "b.gguf")
    assert not any(tmp_path.iterdir())


def test_refuses_a_bpe_vocabulary_without_merges(tiny_model, tmp_path):
    """llama.cpp refuses to load a BPE vocabulary without the merges key, and gguf-py cannot write an empty one: the
    export says so in one line instead of writing a file llama.cpp will not open."""
    src = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), src)
    byte_level_tokenizer(src, vocab_size=256)  # the 256 byte tokens alone: no merges
    assert json.loads((src / "tokenizer.json").read_text())["model"]["merges"] == []
    with pytest.raises(IncompatibleError, match="a BPE vocabulary without merges, which llama.cpp cannot load"):
        ws.export.gguf(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    "value, kind, message", [(float("nan"), "q8_0", "holds NaN or Inf"), (1e6, "f16", "overflows float16")]
)
def test_refuses_values_the_type_cannot_hold(tiny_model, tmp_path, value, kind, message):
    """A NaN, or a value past float16's range in an F16 export, is refused by name while the tensor is being written
    (a chunk at a time); the partial file is removed."""
    src = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), src)
    tensors = dict(ws.open(src).items())
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    ws.save(tensors, src, config=ws.open(src).config, force=True)
    with pytest.raises(ws.WeightsmithError, match=rf"'model.layers.1.mlp.down_proj.weight' {message}"):
        ws.export.gguf(src, tmp_path / "m.gguf", type=kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_refuses_existing_file_without_force(tiny_model, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(ws.WeightsmithError, match="already exists"):
        ws.export.gguf(tiny_model("llama"), out)
    assert out.read_bytes() == b"keep"
    ws.export.gguf(tiny_model("llama"), out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]  # no temporary file left


def test_makes_the_destination_folder_or_refuses_a_file_in_its_way(tiny_model, tmp_path):
    out = tmp_path / "new" / "sub" / "x.gguf"
    ws.export.gguf(tiny_model("llama"), out)
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in out.parent.iterdir()] == ["x.gguf"]
    (tmp_path / "file").write_text("keep")
    with pytest.raises(DestinationError, match="cannot write here"):
        ws.export.gguf(tiny_model("llama"), tmp_path / "file" / "x.gguf")
    assert (tmp_path / "file").read_text() == "keep"


# -- GGUF as an input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3", "gemma3"])
def test_convert_gguf_back_to_transformers(tiny_model, tmp_path, kind):
    src = tiny_model(kind)
    gg = tmp_path / "m.gguf"
    ws.export.gguf(src, gg, type="f32")
    out = tmp_path / "back"
    ws.convert(gg, out)
    model, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    orig = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    atol = 1e-7 if kind == "gemma3" else 0  # Gemma's norms go through w + 1 − 1 in float32
    for name, w in orig.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], w, atol=atol, rtol=0, msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == orig.config.model_type


def test_quantized_gguf_converts_to_its_dequantisation(tiny_model, tmp_path):
    src = tiny_model("llama")
    gg = tmp_path / "m.gguf"
    ws.export.gguf(src, gg, type="q4_0")
    out = tmp_path / "back"
    ws.convert(gg, out)
    back = ws.open(out)
    raw = _dequantised(gg)
    assert torch.equal(back["model.layers.0.mlp.down_proj.weight"], torch.from_numpy(raw["blk.0.ffn_down.weight"]))
    # q is stored permuted; the reader undoes it, so the dequantised q is close to the original q
    q, q0 = back["model.layers.0.self_attn.q_proj.weight"], ws.open(src)["model.layers.0.self_attn.q_proj.weight"]
    assert float(torch.linalg.vector_norm(q - q0) / torch.linalg.vector_norm(q0)) < 0.15
    assert torch.equal(unpermute_qk(torch.from_numpy(raw["blk.0.attn_q.weight"]), 4), q)


def test_inspect_and_diff_read_gguf(tiny_model, tmp_path):
    src = tiny_model("llama")
    gg = tmp_path / "m.gguf"
    ws.export.gguf(src, gg, type="q8_0")
    report = ws.inspect(gg)
    assert report.summary["format"] == "gguf"
    assert report.details["gguf"]["architecture"] == "llama"
    assert report.details["gguf"]["types"] == {"Q8_0": 16, "F32": 5}
    assert report.details["architecture"]["num_key_value_heads"] == 2
    d = ws.diff(src, gg)
    assert d.summary["compared"] == 21 and d.summary["missing_in_b"] == 0
    assert 0 < d.summary["max_abs"] < 1e-3


def test_merge_two_gguf_files(tiny_model, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    ws.export.gguf(tiny_model("llama"), a, type="f32")
    ws.export.gguf(tiny_model("llama", seed=1), b, type="f32")
    out = tmp_path / "merged"
    ws.merge.quick("linear", [str(a), str(b)], out)
    merged, ca, cb = ws.open(out), ws.open(tiny_model("llama")), ws.open(tiny_model("llama", seed=1))
    name = "model.layers.1.self_attn.k_proj.weight"
    torch.testing.assert_close(merged[name], (ca[name] + cb[name]) / 2)


def test_recipe_can_end_in_gguf(tiny_model, tmp_path):
    out = tmp_path / "shipped.gguf"
    recipe = {
        "input": str(tiny_model("llama")),
        "output": str(out),
        "steps": [{"prune": {"sparsity": 0.5}}, {"export_gguf": {"type": "q8_0"}}],
    }
    ws.run(recipe)
    back = ws.open(out)
    w = back["model.layers.0.mlp.up_proj.weight"]
    assert back.format == "gguf" and 0.45 < float((w == 0).float().mean()) < 0.55  # the pruned zeros survive Q8_0


def test_cli_exports_and_refuses_with_one_line(capsys, tiny_model, tmp_path):
    from weightsmith.cli import main

    out = tmp_path / "m.gguf"
    qwen2, gpt2 = tiny_model("qwen2"), tiny_model("gpt2")
    capsys.readouterr()  # drop what the fixtures printed
    assert main(["export", "gguf", str(qwen2), "-o", str(out), "--type", "q4_0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["type"] == "q4_0" and report["summary"]["architecture"] == "qwen2"
    assert main(["export", "gguf", str(gpt2), "-o", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "architecture 'gpt2'" in err[0] and "no GGUF mapping" in err[0]
    assert not (tmp_path / "g.gguf").exists()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["details"]["gguf"]["types"] == {"Q4_0": 16, "F32": 11}
