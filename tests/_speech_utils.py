"""Helpers for the speech tests: a tiny Whisper whose greedy transcripts vary with the audio, with a feature
extractor sized to it, and short chirps written as PCM 16-bit .wav files with the standard library's ``wave``.

The tiny Whisper (tests/_architectures.py) reads 16 mel bins × 64 frames: the feature extractor takes 1 s of
16 kHz audio with a hop of 250 samples, so its features fit the encoder exactly.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
from _architectures import build

RATE = 16_000
CLIPS = {  # name → (rate, channels, start Hz, end Hz): a 16 kHz mono, an 8 kHz mono and a 16 kHz stereo chirp
    "a-16k.wav": (16_000, 1, 300.0, 2_000.0),
    "b-8k.wav": (8_000, 1, 200.0, 1_500.0),
    "c-stereo.wav": (16_000, 2, 900.0, 400.0),
}


def feature_extractor():
    import transformers as tf

    return tf.WhisperFeatureExtractor(feature_size=16, sampling_rate=RATE, hop_length=250, chunk_length=1, n_fft=400)


def tiny_whisper(dest: Path, *, seed: int = 3, extractor: bool = True) -> Path:
    """A tiny Whisper with matrices redrawn at std 2/√fan-in (a default tiny random model repeats one token), saved
    with its feature extractor."""
    model = build("whisper")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 * p.shape[1] ** -0.5)
    model.save_pretrained(dest)
    if extractor:
        feature_extractor().save_pretrained(dest)
    return dest


def chirp(rate: int, channels: int, f0: float, f1: float, seconds: float = 0.6) -> np.ndarray:
    """(frames, channels) int16 samples of a linear chirp from f0 to f1 Hz; the second channel is half as loud and
    a quarter period later, so a stereo file's mono mix differs from either channel."""
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * (f0 + (f1 - f0) * t / (2 * seconds)) * t
    columns = [0.6 * np.sin(phase + c * np.pi / 2) / (1 + c) for c in range(channels)]
    return np.round(np.stack(columns, axis=1) * 32767).astype("<i2")


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def write_clips(folder: Path) -> dict[str, tuple[np.ndarray, int]]:
    """The CLIPS as .wav files in ``folder``; name → (int16 samples, rate)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (rate, channels, f0, f1) in CLIPS.items():
        samples = chirp(rate, channels, f0, f1)
        write_wav(folder / name, samples, rate)
        written[name] = (samples, rate)
    return written
