"""Distillation and evaluation beyond text: image classification (ViT) and seq2seq (T5).

Students are built from the teacher's own layers, trained a few steps, and must load with transformers'
from_pretrained without a missing, mismatched or unexpected key; eval figures are recomputed here with transformers
directly (the image processor and model.generate as the oracles)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import transformers as tf
from _distill_utils import image_folder, tiny_t5, tiny_vit

import weightsmith as ws
from weightsmith import hf
from weightsmith.cli import main
from weightsmith.errors import ConfigError

SOURCES = [
    "translate: the cat sat on the mat",
    "translate: merging models one tensor at a time",
    "translate: streaming keeps memory flat",
    "translate: a small student learns from a teacher",
    "translate: checkpoints are tensor dicts",
    "translate: one shard at a time",
    "translate: pruning removes weights",
    "translate: quantization stores fewer bits",
]


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return tiny_vit(root / "vit"), image_folder(root / "train", per_class=8), image_folder(root / "val", 3, seed=1)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    data = root / "src.txt"
    data.write_text("\n".join(SOURCES) + "\n")
    return tiny_t5(root / "t5"), data


def _loads_cleanly(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# -- images -------------------------------------------------------------------------------------------------------


def _filtered_png(image: np.ndarray) -> bytes:
    """An RGB PNG whose rows use filters 0–4 in turn (written here from the specification, for the reader)."""
    height, width, channels = image.shape
    rows, prior = [], np.zeros(width * channels, dtype=np.int32)
    for y in range(height):
        line, kind = image[y].reshape(-1).astype(np.int32), y % 5
        left = np.concatenate([np.zeros(channels, np.int32), line[:-channels]])
        upleft = np.concatenate([np.zeros(channels, np.int32), prior[:-channels]])
        if kind == 0:
            pred = np.zeros_like(line)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prior
        elif kind == 3:
            pred = (left + prior) // 2
        else:
            p = left + prior - upleft
            pa, pb, pc = abs(p - left), abs(p - prior), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upleft))
        rows.append(bytes([kind]) + ((line - pred) % 256).astype(np.uint8).tobytes())
        prior = line

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def test_png_reader_undoes_every_filter_and_reads_the_writer(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    (tmp_path / "f.png").write_bytes(_filtered_png(image))
    assert np.array_equal(hf.read_image(tmp_path / "f.png"), image)
    grey = image[:, :, 0]
    hf.write_png(tmp_path / "g.png", grey)
    assert np.array_equal(hf.read_image(tmp_path / "g.png")[:, :, 0], grey)


def test_image_folder_numbers_classes_as_image_folder_does(tmp_path):
    folder = image_folder(tmp_path / "imgs", per_class=2)
    (folder / ".hidden").mkdir()
    (folder / "a" / "notes.txt").write_text("not an image")
    images, labels, classes = hf.read_image_folder(folder)
    assert classes == ["a", "b", "c"] and labels == [0, 0, 1, 1, 2, 2]
    assert images[0].shape == (16, 16, 3) and images[0].dtype == np.uint8


def _oracle_logits(model_dir, folder):
    """Logits of transformers' model on the images prepared as preprocessor_config.json says for images already at
    the model's size: (x / 255 − mean) / std (transformers' ViTImageProcessor itself needs PIL, absent here)."""
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    mean, std = torch.tensor(config["image_mean"])[:, None, None], torch.tensor(config["image_std"])[:, None, None]
    model = tf.ViTForImageClassification.from_pretrained(model_dir).eval()
    pixels, labels = [], []
    for index, cls in enumerate(sorted(p.name for p in folder.iterdir())):
        for f in sorted((folder / cls).glob("*.png")):
            image = torch.from_numpy(hf.read_image(f)).permute(2, 0, 1).float()
            pixels.append((image * config["rescale_factor"] - mean) / std)
            labels.append(index)
    with torch.no_grad():
        logits = model(pixel_values=torch.stack(pixels)).logits
    return logits, torch.tensor(labels)


def test_image_processing_follows_the_preprocessor_config(tmp_path):
    config = {"size": {"height": 16, "width": 12}, "resample": 2, "rescale_factor": 0.5, "image_mean": [1, 2, 3],
              "image_std": [2, 2, 2], "do_center_crop": True, "crop_size": {"height": 8, "width": 8}}  # fmt: skip
    prep = hf.ImageProcessing.from_config(config)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    out = prep([grey])
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(grey).permute(2, 0, 1)[None].float().expand(1, 3, 8, 8),
        size=(16, 12),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0].round()
    expected = (resized[:, 4:12, 2:10] * 0.5 - torch.tensor([1.0, 2, 3])[:, None, None]) / 2
    assert out.shape == (1, 3, 8, 8) and torch.allclose(out[0], expected)


def test_image_eval_matches_transformers(vision, tmp_path, capsys):
    vit, _, val = vision
    other = tiny_vit(tmp_path / "other", seed=3)
    report = ws.evaluate(other, val, ref=vit)
    s = report.summary
    mine, labels = _oracle_logits(other, val)
    ref, _ = _oracle_logits(vit, val)
    assert s["kind"] == "image classification" and s["images"] == 9 and s["classes"] == 3
    assert s["accuracy"] == pytest.approx(float((mine.argmax(-1) == labels).float().mean()))
    assert s["ref_accuracy"] == pytest.approx(float((ref.argmax(-1) == labels).float().mean()))
    assert s["agreement"] == pytest.approx(float((mine.argmax(-1) == ref.argmax(-1)).float().mean()))
    kl = torch.nn.functional.kl_div(mine.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert s["kl_per_image"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert s["max_abs"] == pytest.approx(float((mine - ref).abs().max()), rel=1e-4)
    assert main(["eval", str(vit), "--ref", str(vit), "--data", str(val), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)["summary"]
    assert same["agreement"] == 1.0 and same["max_abs"] == 0.0


def test_image_distill_trains_a_loadable_student(vision, tmp_path):
    vit, train, val = vision
    out = tmp_path / "student"
    report = ws.distill(vit, out, train, layers=[0, 2], eval_data=str(val), steps=20, batch_size=8, lr=3e-3)
    s = report.summary
    assert s["kind"] == "image" and s["student_layers"] == 2 and s["train_examples"] == 24
    assert s["loss_last"] < 0.85 * s["loss_first"], s
    student = _loads_cleanly(tf.ViTForImageClassification, out)
    assert student.config.num_hidden_layers == 2 and (out / "preprocessor_config.json").is_file()
    logits, _ = _oracle_logits(out, val)
    ref, _ = _oracle_logits(vit, val)
    agreement = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    assert s["eval_agreement"] == pytest.approx(agreement)
    assert ws.evaluate(out, val, ref=vit).summary["agreement"] == pytest.approx(agreement)


# -- seq2seq ------------------------------------------------------------------------------------------------------


def _oracle_seq2seq(model_dir, ref_dir, texts, max_length=16):
    """Agreement and CE of ``model_dir`` on ``ref_dir``'s greedy outputs, computed with generate and labels=."""
    tok = tf.AutoTokenizer.from_pretrained(ref_dir)
    model = tf.T5ForConditionalGeneration.from_pretrained(model_dir).eval()
    ref = tf.T5ForConditionalGeneration.from_pretrained(ref_dir).eval()
    agree = count = nll = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            target = ref.generate(input_ids=ids, max_new_tokens=max_length, do_sample=False)[:, 1:]
            eos = (target[0] == ref.config.eos_token_id).nonzero()
            target = target[:, : int(eos[0]) + 1] if len(eos) else target
            out = model(input_ids=ids, labels=target)
            agree += float((out.logits.argmax(-1) == target).sum())
            nll += float(out.loss) * target.shape[1]
            count += target.shape[1]
    return agree / count, nll / count


def test_seq2seq_eval_against_the_reference_outputs(t5, tmp_path):
    model, data = t5
    same = ws.evaluate(model, data, ref=model, max_length=16).summary
    assert same["kind"] == "seq2seq" and same["agreement"] == 1.0  # greedy output = argmax of its own logits
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6) and same["ce"] == pytest.approx(same["ref_ce"])
    other = tiny_t5(tmp_path / "other", seed=5)
    s = ws.evaluate(other, data, ref=model, max_length=16).summary
    agreement, ce = _oracle_seq2seq(other, model, SOURCES)
    assert s["agreement"] == pytest.approx(agreement) and s["ce"] == pytest.approx(ce, rel=1e-4)
    assert s["agreement"] < 1.0


def test_seq2seq_distill_from_the_teachers_own_outputs(t5, tmp_path):
    teacher, data = t5
    out = tmp_path / "student"
    report = ws.distill(teacher, out, data, layers=[0, 2], steps=40, batch_size=4, seq_len=16, lr=3e-3)
    s = report.summary
    assert s["kind"] == "seq2seq" and s["student_layers"] == 2 and s["train_examples"] == len(SOURCES)
    assert s["loss_last"] < 0.85 * s["loss_first"], s
    student = _loads_cleanly(tf.T5ForConditionalGeneration, out)
    assert student.config.num_layers == student.config.num_decoder_layers == 2
    before = ws.evaluate(tiny_t5(tmp_path / "untrained", layers=2, seed=9), data, ref=teacher, max_length=16)
    after = ws.evaluate(out, data, ref=teacher, max_length=16).summary
    assert after["ce"] < before.summary["ce"]
    assert after["agreement"] == pytest.approx(_oracle_seq2seq(out, teacher, SOURCES)[0])


def test_seq2seq_with_given_targets_and_refusals(t5, tmp_path):
    teacher, _ = t5
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": s, "target": s[11:]}) + "\n" for s in SOURCES))
    report = ws.distill(teacher, tmp_path / "s", pairs, keep_every=2, steps=2, batch_size=4, seq_len=16)
    assert report.summary["steps"] == 2
    assert ws.evaluate(teacher, pairs).summary["targets"] == "data"
    with pytest.raises(ConfigError, match="must keep layer 0"):
        ws.distill(teacher, tmp_path / "x", pairs, layers=[1, 3], steps=2)
    plain = tmp_path / "plain.txt"
    plain.write_text("no targets here\n")
    with pytest.raises(ConfigError, match="no `ref`"):
        ws.evaluate(teacher, plain)
    assert not (tmp_path / "x").exists()
