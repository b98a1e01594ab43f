"""export onnx for multi-output heads: CLIP zero-shot image classification (scores and both embeddings) and
extractive question answering (start and end logits), checked against transformers' own models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _architectures import build

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.export.to_onnx.config import INT8_WEIGHTS

ort = pytest.importorskip("onnxruntime")

CLIP_OUTPUTS = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The tiny CLIP, with an image processor's settings beside it (written as JSON: CLIPImageProcessor itself needs
    Pillow), exported through the CLI without --task."""
    root = tmp_path_factory.mktemp("clip")
    build("clip").save_pretrained(root / "src")
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16}, "do_resize": True,
                 "crop_size": {"height": 16, "width": 16}, "image_mean": [0.48, 0.46, 0.41],
                 "image_std": [0.27, 0.26, 0.28], "rescale_factor": 1 / 255}  # fmt: skip
    (root / "src" / "preprocessor_config.json").write_text(json.dumps(processor))
    out = root / "onnx" / "model.onnx"
    assert main(["export", "onnx", str(root / "src"), "-o", str(out)]) == 0
    return root / "src", out


def test_clip_zero_shot_graph_has_four_outputs_and_the_processor_beside(clip):
    _, out = clip
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "pixel_values"]
    assert [o.name for o in session.get_outputs()] == CLIP_OUTPUTS
    assert {p.name for p in out.parent.iterdir()} >= {"model.onnx", "config.json", "preprocessor_config.json"}


def test_clip_scores_one_image_against_many_labels_as_transformers_does(clip):
    """Texts and images have batches of their own: 1 image × 5 padded labels, and 3 images × 2 labels, shapes the
    export never saw; every output against transformers' CLIPModel."""
    import transformers as tf

    src, out = clip
    model = tf.CLIPModel.from_pretrained(src).eval()
    session, gen = _session(out), torch.Generator().manual_seed(6)
    for images, texts, seq in [(1, 5, 9), (3, 2, 4)]:
        ids = torch.randint(3, 128, (texts, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2 :] = 0
        pixels = torch.randn(images, 3, 16, 16, generator=gen)
        feeds = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
        with torch.no_grad():
            expected = model(**feeds)
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert got[0].shape == (images, texts) and got[1].shape == (texts, images)
        for name, g in zip(CLIP_OUTPUTS, got):
            assert (torch.from_numpy(g) - getattr(expected, name)).abs().max().item() <= 1e-4, (name, images, texts)


def _has_vnni() -> bool:
    """This x86 CPU multiplies u8×s8 with VNNI (AVX512-VNNI or AVX-VNNI), without 16-bit saturation."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni"})


@pytest.mark.parametrize("weights", INT8_WEIGHTS)
def test_clip_int8_quality_covers_the_embeddings(clip, tmp_path, weights):
    """Each weight type writes the codes it names. int8 (7-bit codes, which the u8×s8 kernels of CPUs without VNNI sum
    without saturating) and uint8 keep the quality on any CPU; full 8-bit codes only on a CPU with VNNI (elsewhere
    they may lose it: not checked there, nor refused, so that the codes are checked on every machine)."""
    import onnx
    from onnx.numpy_helper import to_array

    src, _ = clip
    any_cpu = weights != "int8-vnni"
    scheme = ws.export.to_onnx.Int8Dynamic(weights=weights, min_cosine=0.98 if any_cpu else -1)
    report = ws.export.onnx(src, tmp_path / "model.onnx", task="zero-shot-image-classification", quantize=scheme)
    quality = report.details["int8"]
    assert quality["weights"] == weights and quality["inputs"] == "random token ids and pixel values"
    assert quality["cosine_mean"] <= 1
    if any_cpu or _has_vnni():
        assert quality["cosine_mean"] >= 0.98
    assert report.summary["output"] == CLIP_OUTPUTS
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    initializers = {i.name: i for i in graph.initializer}
    codes = [to_array(initializers[n.input[1]]) for n in graph.node if n.op_type == "MatMulInteger"]
    assert codes and {c.dtype.name for c in codes} == {"uint8" if weights == "uint8" else "int8"}
    widest = max(int(abs(c.astype("int32")).max()) for c in codes)
    if weights == "int8":
        assert widest <= 64
    elif weights == "int8-vnni":
        assert widest == 127  # symmetric per channel: each channel's largest weight is ±127


def test_siglip_is_inferred_and_matches_transformers(tmp_path):
    import transformers as tf

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)  # fmt: skip
    torch.manual_seed(0)
    src, out = tmp_path / "siglip", tmp_path / "onnx" / "model.onnx"
    tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(src)
    report = ws.export.onnx(src, out)
    assert report.summary["task"] == "zero-shot-image-classification"
    model = tf.SiglipModel.from_pretrained(src).eval()
    gen = torch.Generator().manual_seed(1)
    feeds = {"input_ids": torch.randint(3, 128, (4, 16), generator=gen)}
    feeds["attention_mask"] = torch.ones_like(feeds["input_ids"])
    feeds["pixel_values"] = torch.randn(2, 3, 16, 16, generator=gen)
    with torch.no_grad():
        expected = model(**feeds)
    got = _session(out).run(None, {k: v.numpy() for k, v in feeds.items()})
    for name, g in zip(CLIP_OUTPUTS, got):
        assert (torch.from_numpy(g) - getattr(expected, name)).abs().max().item() <= 1e-4, name


@pytest.fixture(scope="module")
def bert_qa(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=64)  # fmt: skip
    out = tmp_path_factory.mktemp("bert-qa")
    tf.BertForQuestionAnswering(config).eval().save_pretrained(out)
    return out


def test_question_answering_inferred_with_start_and_end_logits(bert_qa, tmp_path):
    import transformers as tf

    out = tmp_path / "qa" / "model.onnx"
    report = ws.export.onnx(bert_qa, out)
    assert report.summary["task"] == "question-answering"
    assert report.summary["output"] == ["start_logits", "end_logits"]
    session = _session(out)
    assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]
    model = tf.AutoModelForQuestionAnswering.from_pretrained(bert_qa).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:], mask[2, 9:] = 0, 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1  # question, then context
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    with torch.no_grad():
        expected = model(**feeds)
    start, end = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    keep = mask.bool()
    for got, want in ((start, expected.start_logits), (end, expected.end_logits)):
        assert got.shape == (3, 21) and (torch.from_numpy(got)[keep] - want[keep]).abs().max().item() <= 1e-4


def test_question_answering_refused_for_a_model_without_its_head(tiny_model, tmp_path, capsys):
    out = tmp_path / "x" / "model.onnx"
    src = tiny_model("gpt2")
    capsys.readouterr()
    assert main(["export", "onnx", str(src), "-o", str(out), "--task", "question-answering"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "question-answering" in err and "exports as text-generation-with-past" in err
    assert not out.parent.exists()
