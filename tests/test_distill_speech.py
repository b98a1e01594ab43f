"""distill for speech recognition (Whisper): the student learns the teacher's own greedy transcripts of .wav files
(or given transcripts), read through the teacher's feature extractor and decoder prompt; it loads with transformers
without a missing, mismatched or unexpected key and agrees with the teacher more than before training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf
from _distill_utils import char_tokenizer
from _speech_utils import chirp, tiny_whisper, write_clips, write_wav

import weightsmith as ws
from weightsmith.checkpoint import Checkpoint
from weightsmith.cli import main
from weightsmith.compress.distill.student import write_student
from weightsmith.compress.distill.train import _speech_batch


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(tiny 2-layer Whisper with its feature extractor, a folder of 8 chirps at 16 and 8 kHz)."""
    root = tmp_path_factory.mktemp("distill-speech")
    model = tiny_whisper(root / "whisper")
    clips = root / "clips"
    write_clips(clips)
    for i in range(5):
        write_wav(clips / f"d{i}.wav", chirp(16_000, 1, 200.0 + 150 * i, 2_500.0 - 300 * i), 16_000)
    return model, clips


def test_the_decoder_reads_the_prompt_and_only_the_transcript_counts():
    features = torch.zeros(16, 64)
    batch = _speech_batch([(features, [1, 100, 102], [5, 6, 2]), (features, [1], [7, 2])], [0, 1])
    assert batch.inputs["decoder_input_ids"].tolist() == [[1, 100, 102, 5, 6], [1, 7, 0, 0, 0]]
    assert batch.inputs["decoder_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.targets[batch.mask.bool()].tolist() == [5, 6, 2, 7, 2]
    assert batch.inputs["input_features"].shape == (2, 16, 64)


def test_distil_whisper_from_the_teachers_own_transcripts(teacher, tmp_path):
    model, clips = teacher
    out = tmp_path / "student"
    s = ws.distill(model, out, clips, layers=[0], steps=20, batch_size=4, seq_len=12, lr=3e-3).summary
    assert s["kind"] == "speech" and s["student_layers"] == 1 and s["train_examples"] == 8, s
    assert s["loss_last"] < 0.85 * s["loss_first"], s
    student, info = tf.WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert student.config.encoder_layers == student.config.decoder_layers == 1
    assert (out / "preprocessor_config.json").is_file()  # eval reads the student's own features
    untrained = write_student(Checkpoint(model), tmp_path / "untrained", [0])
    before = ws.evaluate(untrained, clips, ref=model, max_length=12).summary
    after = ws.evaluate(out, clips, ref=model, max_length=12).summary
    assert after["kind"] == "speech" and after["target_tokens"] == before["target_tokens"]
    assert after["agreement"] > before["agreement"] and after["kl_per_token"] < before["kl_per_token"]


def test_distil_whisper_on_given_transcripts(teacher, tmp_path):
    model, clips = teacher
    with_tok = tmp_path / "teacher"
    shutil.copytree(model, with_tok)
    char_tokenizer(causal=True).save_pretrained(with_tok)
    data = tmp_path / "pairs.jsonl"
    lines = [{"audio": str(f), "target": f"clip {f.stem}"} for f in sorted(clips.iterdir())]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    s = ws.distill(with_tok, tmp_path / "student", data, layers=[1], steps=4, batch_size=4, eval_data=data).summary
    assert s["kind"] == "speech" and s["train_examples"] == s["eval_examples"] == len(lines) and s["loss_finite"]
    assert s["eval_ce"] > 0
    assert (tmp_path / "student" / "tokenizer.json").is_file()


def test_text_data_for_a_speech_teacher_is_refused_in_one_line(teacher, tmp_path, capsys):
    model, clips = teacher
    data = tmp_path / "list.txt"
    data.write_text("clip one\n")
    capsys.readouterr()
    argv = ["distill", "--teacher", str(model), "-o", str(tmp_path / "student"), "--data", str(data), "--layers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a folder of .wav files or a .jsonl" in err, err
    assert not (tmp_path / "student").exists()
