"""export onnx: onnxruntime's outputs checked here against transformers' own (the peer), independently of the
validation the export does itself; refusals through the CLI leave nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SENTENCES, embed

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.errors import ConfigError

ort = pytest.importorskip("onnxruntime")  # a declared dependency: present whenever the suite runs


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _padded_batch(vocab: int, batch: int, seq: int, names, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids, right padding: row i keeps seq − i·seq/(2·batch) tokens (row 0 full)."""
    gen = torch.Generator().manual_seed(seed + 31 * batch + seq)
    lengths = torch.tensor([seq - (i * seq) // (2 * batch) for i in range(batch)])
    feeds = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
        "attention_mask": (torch.arange(seq)[None] < lengths[:, None]).long(),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
    }
    return {n: feeds[n] for n in names}


def _max_abs_non_pad(session, model, feeds, output: str) -> float:
    got = torch.from_numpy(session.run(None, {n: t.numpy() for n, t in feeds.items()})[0])
    with torch.no_grad():
        expected = getattr(model(**feeds), output)
    keep = feeds["attention_mask"].bool()
    return (got[keep] - expected[keep]).abs().max().item()


@pytest.fixture(scope="module")
def minilm_onnx(minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-onnx") / "model.onnx"
    return out, ws.export.onnx(minilm_path, out, task="feature-extraction", benchmark=True)


@pytest.fixture(scope="module")
def minilm_int8(minilm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-int8") / "model.onnx"
    return out, ws.export.onnx(minilm_path, out, task="feature-extraction", quantize="int8")


def test_minilm_feature_extraction_parity(minilm_onnx, minilm_path):
    import transformers as tf

    out, report = minilm_onnx
    session = _session(out)
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == ["attention_mask", "input_ids", "token_type_ids"]
    for i in session.get_inputs():  # batch and sequence are symbolic, not the 2×16 example's sizes
        assert all(isinstance(d, str) for d in i.shape), i.shape
    model = tf.AutoModel.from_pretrained(minilm_path).eval()
    for batch in (1, 8):
        for seq in (8, 128):
            feeds = _padded_batch(model.config.vocab_size, batch, seq, names)
            assert _max_abs_non_pad(session, model, feeds, "last_hidden_state") <= 1e-4, (batch, seq)
    assert report.summary["parity_max_abs"] <= 1e-4
    assert report.summary["opset"] >= 18 and report.summary["nodes"] > 50
    assert set(report.details["parity (max |Δ| by batch×sequence)"]) == {"1x8", "1x128", "8x8", "8x128"}
    latency = report.details["latency (median ms)"]
    assert latency["threads"] == 1 and latency["torch_eager"] > 0 and latency["ort_float"] > 0


def test_graphs_carry_no_exporter_debug_metadata(minilm_onnx, minilm_int8):
    """The exporter's per-node stack traces (with this machine's file paths) and scopes are not shipped; the
    provenance record is."""
    import onnx

    for out, _ in (minilm_onnx, minilm_int8):
        proto = onnx.load(str(out))
        assert [n.name for n in proto.graph.node if n.metadata_props] == []
        assert b"stack_trace" not in out.read_bytes() and b"weightsmith/export" not in out.read_bytes()
        assert "weightsmith" in {p.key for p in proto.metadata_props}


def test_minilm_tokenizer_beside_the_graph_gives_sentence_embeddings(minilm_onnx, minilm_path):
    import transformers as tf

    out, _ = minilm_onnx
    tok = tf.AutoTokenizer.from_pretrained(out.parent)  # written beside model.onnx
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
    hidden = _session(out).run(None, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = torch.nn.functional.normalize(torch.from_numpy((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
    reference = embed(minilm_path)
    assert (pooled - reference).abs().max().item() <= 1e-4


def test_minilm_int8_is_small_and_close(minilm_onnx, minilm_int8, minilm_path):
    import onnx
    import transformers as tf

    (float_out, _), (out, report) = minilm_onnx, minilm_int8
    assert out.stat().st_size <= 0.3 * float_out.stat().st_size
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, ops
    tok = tf.AutoTokenizer.from_pretrained(out.parent)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
    hidden = _session(out).run(None, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = torch.nn.functional.normalize(torch.from_numpy((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
    cosine = (pooled * embed(minilm_path)).sum(-1)  # per sentence, against transformers' float embeddings
    assert cosine.mean().item() >= 0.99 and cosine.min().item() >= 0.98, cosine
    quality = report.details["int8"]
    assert quality["size_ratio"] <= 0.3 and 0.98 <= quality["cosine_mean"] <= 1
    assert report.summary["quantize"] == "int8"
    assert "latency (median ms)" not in report.details  # the benchmark is opt-in


@pytest.mark.parametrize("kind, optimize", [("llama", True), ("gpt2", False)])
def test_causal_lm_logits_parity_with_dynamic_sequence(kind, optimize, tiny_model, tmp_path):
    import onnx
    import transformers as tf

    src = tiny_model(kind)
    out = tmp_path / "onnx" / "model.onnx"
    report = ws.export.onnx(src, out, task="causal-lm", optimize=optimize)
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape)
    model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    for batch, seq in [(1, 5), (3, 17), (2, 40), (1, 64)]:  # none of them the export's example shape
        feeds = _padded_batch(model.config.vocab_size, batch, seq, ["input_ids", "attention_mask"], seed=7)
        assert _max_abs_non_pad(session, model, feeds, "logits") <= 1e-4, (batch, seq)
    assert report.summary["output"] == "logits" and report.summary["optimized"] is optimize
    assert len(onnx.load(str(out)).graph.node) == report.summary["nodes"]
    assert (out.parent / "config.json").is_file()


@pytest.fixture(scope="module")
def tiny_masked_lm(tmp_path_factory):
    """A tiny random BertForMaskedLM (conftest has no masked-LM kind), saved the transformers way."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    out = tmp_path_factory.mktemp("bert-mlm")
    tf.BertForMaskedLM(config).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_token_classifier(tmp_path_factory):
    """A tiny random BertForTokenClassification (5 labels): the task is inferred from its architectures."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=5,
    )
    out = tmp_path_factory.mktemp("bert-tok")
    tf.BertForTokenClassification(config).eval().save_pretrained(out)
    return out


@pytest.mark.parametrize("task", ["text-classification", "masked-lm", "token-classification"])
def test_encoder_heads_parity(task, tiny_model, tiny_masked_lm, tiny_token_classifier, tmp_path):
    import transformers as tf

    src, auto = {
        "text-classification": (tiny_model("bert_cls"), tf.AutoModelForSequenceClassification),
        "masked-lm": (tiny_masked_lm, tf.AutoModelForMaskedLM),
        "token-classification": (tiny_token_classifier, tf.AutoModelForTokenClassification),
    }[task]
    out = tmp_path / "model.onnx"
    report = ws.export.onnx(src, out, task=None if task == "token-classification" else task)
    assert report.summary["task"] == task  # token classification: inferred from BertForTokenClassification
    session, model = _session(out), auto.from_pretrained(src).eval()
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]  # no tokenizer: BERT's signature
    for batch, seq in [(1, 7), (5, 33)]:
        feeds = _padded_batch(model.config.vocab_size, batch, seq, names, seed=3)
        got = torch.from_numpy(session.run(None, {n: t.numpy() for n, t in feeds.items()})[0])
        with torch.no_grad():
            expected = model(**feeds).logits
        if task != "text-classification":  # per-token logits: the pad positions are free
            keep = feeds["attention_mask"].bool()
            got, expected = got[keep], expected[keep]
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-4, (batch, seq)


def test_external_data_layout(tiny_model, tmp_path, monkeypatch):
    """Above the threshold (2 GB in use, lowered here) the weights go to one model.onnx.data beside the graph."""
    import onnx
    import transformers as tf

    from weightsmith.export.to_onnx import files

    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", 0)
    src, out = tiny_model("gpt2"), tmp_path / "big" / "model.onnx"
    ws.export.onnx(src, out, task="causal-lm")
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["config.json", "generation_config.json", "model.onnx", "model.onnx.data"]
    locations = {
        e.value
        for t in onnx.load(str(out), load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "location"
    }
    assert locations == {"model.onnx.data"}
    assert (out.parent / "model.onnx.data").stat().st_size > out.stat().st_size  # tensors under 1 KB stay inline
    model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    feeds = _padded_batch(model.config.vocab_size, 2, 11, ["input_ids", "attention_mask"])
    assert _max_abs_non_pad(_session(out), model, feeds, "logits") <= 1e-4


# -- refusals: one line, exit 2, nothing written -----------------------------------------------------------------


def _nothing_written(folder):
    return not folder.exists()  # not even the folder the export would have created


@pytest.mark.parametrize(
    "kind, task, words", [("gpt2", "text-classification", "score"), ("bert", "causal-lm", "lacks")]
)
def test_cli_refuses_a_task_the_checkpoint_cannot_serve(kind, task, words, tiny_model, tmp_path, capsys):
    out, src = tmp_path / "x" / "model.onnx", tiny_model(kind)
    capsys.readouterr()  # the fixture's own output
    assert main(["export", "onnx", str(src), "-o", str(out), "--task", task]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and task in err and words in err
    assert _nothing_written(out.parent)


def test_cli_refuses_an_export_that_fails_parity(tiny_model, tmp_path, capsys):
    out, src = tmp_path / "x" / "model.onnx", tiny_model("gpt2")
    capsys.readouterr()
    assert main(["export", "onnx", str(src), "-o", str(out), "--task", "causal-lm", "--atol", "1e-30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "differs from PyTorch" in err and "1e-30" in err
    assert _nothing_written(out.parent)


def test_cli_refuses_existing_output_and_bad_options(tiny_model, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", "onnx", str(tiny_model("llama")), "-o", str(out), "--task", "causal-lm"]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert main(["export", "onnx", str(tiny_model("llama")), "-o", str(tmp_path / "dir"), "--task", "causal-lm"]) == 2
    assert ".onnx" in capsys.readouterr().err and not (tmp_path / "dir").exists()
    with pytest.raises(ConfigError, match="task 'summarize'"):
        ws.export.onnx(tiny_model("llama"), tmp_path / "m.onnx", task="summarize")
    with pytest.raises(ConfigError, match="weights 'int4': expected one of int8, uint8, int8-vnni"):
        ws.export.to_onnx.Int8Dynamic(weights="int4")
    with pytest.raises(ConfigError, match="min_cosine 2"):
        ws.export.to_onnx.Int8Dynamic(min_cosine=2)


def test_quantized_input_is_dequantized_for_export(tiny_model, tmp_path):
    """A compressed-tensors int8 checkpoint is exported through weightsmith's dequantize (W = q·s, whose own tests
    hold it to the format); the graph must then match transformers running that float checkpoint."""
    import transformers as tf

    quantized, floats = tmp_path / "int8", tmp_path / "float"
    ws.quantize(tiny_model("llama"), quantized, "int8")
    ws.dequantize(quantized, floats, dtype="float32")
    out = tmp_path / "onnx" / "model.onnx"
    report = ws.export.onnx(quantized, out, task="causal-lm")
    assert any("compressed-tensors checkpoint dequantized" in n for n in report.notes)
    model = tf.AutoModelForCausalLM.from_pretrained(floats).eval()
    feeds = _padded_batch(model.config.vocab_size, 2, 12, ["input_ids", "attention_mask"])
    assert _max_abs_non_pad(_session(out), model, feeds, "logits") <= 1e-4


def test_vit_image_classification_inferred_and_int8(tmp_path):
    """A ViT classifier: the task follows its architectures; logits match transformers' at batch sizes the export
    never used; int8 carries its quality figure."""
    import transformers as tf
    from _architectures import build

    src, out = tmp_path / "vit", tmp_path / "onnx" / "model.onnx"
    build("vit").save_pretrained(src)
    report = ws.export.onnx(src, out, quantize="int8")
    assert report.summary["task"] == "image-classification" and report.summary["inputs"] == ["pixel_values"]
    assert report.details["int8"]["inputs"] == "random pixel values" and report.details["int8"]["cosine_mean"] >= 0.98
    float_out = tmp_path / "onnx-float" / "model.onnx"
    ws.export.onnx(src, float_out, task="image-classification")
    model = tf.AutoModelForImageClassification.from_pretrained(src).eval()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    got = torch.from_numpy(_session(float_out).run(None, {"pixel_values": pixels.numpy()})[0])
    assert got.shape == (3, 3) and (got - expected).abs().max().item() <= 1e-4
    int8 = torch.from_numpy(_session(out).run(None, {"pixel_values": pixels.numpy()})[0])
    assert torch.nn.functional.cosine_similarity(int8, expected, dim=-1).min().item() >= 0.98
