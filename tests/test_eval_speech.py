"""eval for speech recognition (Whisper): .wav folders and .jsonl lists read with ``wave``, resampled and mixed to
mono, turned into features by the checkpoint's own feature extractor; agreement and cross-entropy checked against
transformers' own ``generate`` and ``labels=`` loss, and the features against a resampling done here with scipy."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import wave

import numpy as np
import pytest
import torch
import transformers as tf
from _distill_utils import char_tokenizer
from _speech_utils import CLIPS, RATE, feature_extractor, tiny_whisper, write_clips
from scipy.signal import resample_poly

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.evaluation.speech import decoder_prompt, greedy_transcript, speech_features

NEW_TOKENS = 31  # the tiny Whisper's 32 decoder positions less the start token
MAX = 12  # transcript tokens where the test needs fewer (`max_length`): the tests stay fast


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """(tiny Whisper, its int8 quantization, the clips folder, name → (int16 samples, rate))."""
    root = tmp_path_factory.mktemp("speech")
    model = tiny_whisper(root / "whisper")
    ws.quantize(model, root / "int8", scheme="int8")
    clips = write_clips(root / "clips")
    return model, root / "int8", root / "clips", clips


def _features(samples: np.ndarray, rate: int) -> torch.Tensor:
    """Features computed here: the channels averaged, 8 kHz → 16 kHz by scipy's polyphase resampling (up 2)."""
    mono = samples.astype(np.float64).mean(axis=1) / 32768.0
    if rate != RATE:
        assert RATE % rate == 0
        mono = resample_poly(mono, RATE // rate, 1)
    return feature_extractor()(mono.astype(np.float32), sampling_rate=RATE, return_tensors="pt")["input_features"]


def _oracle(model_dir, ref_dir, clips) -> tuple[float, float, int]:
    """Agreement and ce of ``model_dir`` on the greedy transcripts Whisper's own ``generate`` writes with
    ``ref_dir``, from transformers' ``labels=`` loss (labels shifted right behind the decoder start token)."""
    model = tf.WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    ref = tf.WhisperForConditionalGeneration.from_pretrained(ref_dir).eval()
    agree = nll = count = 0.0
    with torch.no_grad():
        for samples, rate in clips.values():
            features = _features(samples, rate)
            target = ref.generate(input_features=features, max_new_tokens=MAX, do_sample=False)[0].tolist()
            target = target[1:] if target[0] == ref.config.decoder_start_token_id else target
            target = target[: target.index(2) + 1] if 2 in target else target  # up to and including EOS
            out = model(input_features=features, labels=torch.tensor([target]))
            agree += float((out.logits[0].argmax(-1) == torch.tensor(target)).sum())
            nll += float(out.loss) * len(target)
            count += len(target)
    return agree / count, nll / count, int(count)


def test_a_model_against_itself(speech, capsys):
    model, _, folder, clips = speech
    capsys.readouterr()
    assert main(["eval", str(model), "--ref", str(model), "--data", str(folder), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["summary"]
    assert s["kind"] == "speech" and s["audio_files"] == len(clips) and s["sampling_rate"] == RATE
    assert s["agreement"] == 1.0  # a greedy transcript is the argmax of its own teacher-forced logits
    assert s["kl_per_token"] == pytest.approx(0.0, abs=1e-7) and s["max_abs"] == 0 and s["ce"] == s["ref_ce"]
    assert s["target_tokens"] > len(clips)


def test_int8_against_the_reference_matches_transformers_loss(speech):
    model, int8, folder, clips = speech
    s = ws.evaluate(int8, folder, ref=model, max_length=MAX).summary
    agreement, ce, tokens = _oracle(int8, model, clips)
    assert s["target_tokens"] == tokens
    assert s["agreement"] == pytest.approx(agreement) and s["ce"] == pytest.approx(ce, rel=1e-5)
    assert s["ref_ce"] == pytest.approx(_oracle(model, model, clips)[1], rel=1e-5)
    assert s["agreement"] < 1.0 and s["kl_per_token"] > 0 and s["max_abs"] > 0


def test_a_jsonl_list_reads_the_same_files(speech, tmp_path):
    model, int8, folder, _ = speech
    (tmp_path / "clips").symlink_to(folder)
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"audio": f"clips/{name}"}) + "\n" for name in CLIPS))  # relative paths
    a = ws.evaluate(int8, listing, ref=model, max_length=MAX).summary
    b = ws.evaluate(int8, folder, ref=model, max_length=MAX).summary
    keys = ("audio_files", "agreement", "ce", "kl_per_token", "target_tokens")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("name", ["b-8k.wav", "c-stereo.wav", "a-16k.wav"])
def test_features_match_a_resampling_done_here(speech, name):
    _, _, folder, clips = speech
    samples, rate = clips[name]
    got = speech_features(feature_extractor(), folder / name)
    expected = _features(samples, rate)
    assert got.shape == expected.shape == (1, 16, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if rate != RATE:  # the resampling matters: the 8 kHz samples read as if at 16 kHz give other features
        naive = feature_extractor()(samples[:, 0] / 32768.0, sampling_rate=RATE, return_tensors="pt")
        assert (naive["input_features"] - got).abs().max() > 0.1


def test_targets_from_the_data_without_a_reference(speech, tmp_path):
    """No ``ref``: the .jsonl's ``target`` transcripts, tokenized by the model's tokenizer and ended by its EOS."""
    model, _, folder, _ = speech
    with_tok = tmp_path / "whisper"
    shutil.copytree(model, with_tok)
    tokenizer = char_tokenizer(causal=True)
    tokenizer.save_pretrained(with_tok)
    transcripts = {"a-16k.wav": "rising tone", "b-8k.wav": "low", "c-stereo.wav": "falling, in stereo"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"audio": str(folder / k), "target": v}) + "\n" for k, v in transcripts.items()))
    s = ws.evaluate(with_tok, data).summary
    whisper = tf.WhisperForConditionalGeneration.from_pretrained(with_tok).eval()
    nll = count = 0.0
    with torch.no_grad():
        for name, text in transcripts.items():
            labels = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            loss = whisper(
                input_features=speech_features(feature_extractor(), folder / name), labels=torch.tensor([labels])
            ).loss
            nll, count = nll + float(loss) * len(labels), count + len(labels)
    assert s["targets"] == "data" and s["target_tokens"] == count and "ref" not in s
    assert s["ce"] == pytest.approx(nll / count, rel=1e-5)


def test_multilingual_prompt_and_suppressed_tokens(speech, tmp_path):
    """A multilingual generation config: the prompt is start, the detected language, transcribe, no-timestamps;
    suppressed tokens are never written, and agreement counts the choice among the tokens greedy may write."""
    model, _, folder, clips = speech
    multi = tmp_path / "multi"
    shutil.copytree(model, multi)
    gen = tf.GenerationConfig.from_pretrained(multi)
    gen.lang_to_id, gen.task_to_id = {"<|en|>": 100, "<|de|>": 101}, {"transcribe": 102, "translate": 103}
    gen.no_timestamps_token_id, gen.forced_decoder_ids = 104, [[1, None], [2, 102]]
    whisper = tf.WhisperForConditionalGeneration.from_pretrained(multi).eval()
    features = speech_features(feature_extractor(), folder / "a-16k.wav")
    with torch.no_grad():
        logits = whisper(input_features=features, decoder_input_ids=torch.tensor([[1]])).logits[0, -1]
    language = 100 + int(logits[100:102].argmax())
    prompt = [1, language, 102, 104]
    with torch.no_grad():
        free = whisper(input_features=features, decoder_input_ids=torch.tensor([prompt])).logits[0, -1]
    gen.suppress_tokens, gen.begin_suppress_tokens = [int(free.argmax())], [2]
    gen._from_model_config = False  # else transformers rebuilds the generation config from config.json
    gen.save_pretrained(multi)
    whisper.generation_config = gen
    assert decoder_prompt(whisper, features) == prompt
    s = ws.evaluate(multi, folder, ref=multi).summary  # the decoder's 32 positions: 4 for the prompt, 28 written
    assert s["agreement"] == 1.0 and s["target_tokens"] == len(clips) * (NEW_TOKENS - 3)
    written = greedy_transcript(whisper, features, prompt, max_new_tokens=MAX)  # the raw argmax first is suppressed
    assert gen.suppress_tokens[0] not in written and written[0] != 2


def _float_wav(path):
    """A WAVE_FORMAT_IEEE_FLOAT file: a valid RIFF header that the wave module does not read."""
    data = np.zeros(160, np.float32).tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, RATE, RATE * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


CASES = [
    ("empty_folder", "no .wav files"),
    ("float_wav", "not a PCM .wav file"),
    ("not_a_wav", "not a PCM .wav file"),
    ("eight_bit", "8-bit samples"),
    ("text_data", "a folder of .wav files or a .jsonl"),
    ("missing_audio", "audio file not found"),
    ("no_extractor", "no preprocessor_config.json"),
    ("no_target", "'target'"),
]


@pytest.mark.parametrize("case, message", CASES)
def test_bad_speech_input_is_refused_in_one_line(speech, tmp_path, capsys, case, message):
    model, _, folder, _ = speech
    bad = tmp_path / "bad"
    bad.mkdir()
    ref = ["--ref", str(model)]
    if case == "float_wav":
        _float_wav(bad / "x.wav")
    elif case == "not_a_wav":
        (bad / "x.wav").write_bytes(b"ID3 not audio at all")
    elif case == "eight_bit":
        with wave.open(str(bad / "x.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(1)
            w.setframerate(RATE)
            w.writeframes(bytes(200))
    elif case == "text_data":
        bad = tmp_path / "list.txt"
        bad.write_text(str(folder / "a-16k.wav") + "\n")
    elif case == "missing_audio":
        bad = tmp_path / "list.jsonl"
        bad.write_text(json.dumps({"audio": "nope.wav"}) + "\n")
    elif case == "no_extractor":
        model = tiny_whisper(tmp_path / "bare", extractor=False)
        bad, ref = folder, []
    elif case == "no_target":
        bad, ref = folder, []
    capsys.readouterr()
    code = main(["eval", str(model), "--data", str(bad), *ref])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    if case == "float_wav":
        assert str(bad / "x.wav") in err


def test_help_names_the_audio_data(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert ".wav" in out and "audio" in out


def test_without_scipy_another_rate_is_refused_and_the_same_rate_is_read(speech, monkeypatch):
    _, _, folder, clips = speech
    monkeypatch.setitem(sys.modules, "scipy.signal", None)  # import scipy.signal → ImportError
    with pytest.raises(ws.errors.ConfigError, match=r"b-8k\.wav: sampled at 8000 Hz, .* 16000 Hz, and scipy"):
        speech_features(feature_extractor(), folder / "b-8k.wav")
    with pytest.raises(ws.errors.ConfigError, match=r"b-8k\.wav: sampled at 8000 Hz"):  # checked before any load
        ws.evaluate(folder.parent / "whisper", folder, ref=folder.parent / "whisper")
    same = speech_features(feature_extractor(), folder / "a-16k.wav")
    torch.testing.assert_close(same, _features(*clips["a-16k.wav"]), atol=1e-5, rtol=1e-5)
