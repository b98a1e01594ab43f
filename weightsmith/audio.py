"""Audio for the speech verbs: PCM 16-bit ``.wav`` files read with the standard library's ``wave`` module, mixed
down to mono and resampled to the rate a feature extractor expects, and the two forms speech data takes (a folder
of ``.wav`` files, or a ``.jsonl`` file whose lines name them).

Resampling is polyphase: ``scipy.signal.resample_poly(x, up, down)`` with up = R / gcd(r, R) and down = r / gcd(r, R)
for a file at r Hz and a feature extractor at R Hz (an FIR low-pass, Kaiser window β = 5, at the lower of the two
Nyquist rates, then up·x/down). Without scipy a file at another rate is refused.

numpy is imported inside the functions: importing this module stays numpy-free.

>>> records = read_audio_records("clips/")                     # doctest: +SKIP
>>> samples = load_audio(records[0]["audio"], 16_000)          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError

AUDIO_SUFFIXES = (".wav",)


def _open(path: Path, *, header_only: bool) -> tuple[bytes, int, int]:
    """(PCM bytes, or b"" when ``header_only``; channels; rate) of a PCM 16-bit .wav file with samples."""
    if not path.is_file():
        raise ConfigError(f"{path}: audio file not found")
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = b"" if header_only or width != 2 else w.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise ConfigError(f"{path}: not a PCM .wav file ({exc})") from None
    if width != 2:
        raise ConfigError(f"{path}: {8 * width}-bit samples; only PCM 16-bit .wav files are read")
    if frames == 0 or (not header_only and len(raw) < 2 * channels):
        raise ConfigError(f"{path}: the .wav file holds no samples")
    return raw, channels, rate


def check_wav(path: str | os.PathLike, target: int | None = None) -> int:
    """The rate of a .wav file ``read_wav`` reads, from its header alone: refuses what ``read_wav`` refuses (but a
    file cut short after its header), and with ``target`` a rate that cannot be resampled to it, so that a bad file
    among many is named before any work starts."""
    rate = _open(Path(path), header_only=True)[2]
    if target is not None and rate != target:
        _resampler(path, rate, target)
    return rate


def read_wav(path: str | os.PathLike) -> tuple[Any, int]:
    """(samples, rate) of a PCM 16-bit .wav file: float32 samples in [−1, 1), the channels averaged to mono.

    Refuses, in one line naming the file, a missing or unreadable file, a compressed or float encoding (the ``wave``
    module reads integer PCM only), another sample width, and a file without samples.
    """
    import numpy as np

    raw, channels, rate = _open(Path(path), header_only=False)
    frames = len(raw) // (2 * channels)
    pcm = np.frombuffer(raw[: frames * 2 * channels], dtype="<i2").reshape(frames, channels)  # (frames, channels)
    return (pcm.astype(np.float32).mean(axis=1) / 32768.0).astype(np.float32), rate


def resample(samples: Any, rate: int, target: int, *, where: object = "audio") -> Any:
    """``samples`` at ``rate`` Hz as ``target`` Hz, by polyphase filtering (scipy.signal.resample_poly with
    up = target / g, down = rate / g, g = gcd(rate, target)); unchanged when the rates agree."""
    import numpy as np

    if rate == target:
        return samples
    g = math.gcd(rate, target)
    resample_poly = _resampler(where, rate, target)
    return resample_poly(samples.astype(np.float64), target // g, rate // g).astype(np.float32)  # float64 filter


def _resampler(where: object, rate: int, target: int):
    try:
        from scipy.signal import resample_poly
    except ImportError:
        raise ConfigError(
            f"{where}: sampled at {rate} Hz, the feature extractor reads {target} Hz, and scipy (to resample) is "
            "not installed"
        ) from None
    return resample_poly


def load_audio(path: str | os.PathLike, rate: int) -> Any:
    """The mono float32 samples of a .wav file at ``rate`` Hz (resampled when the file has another rate)."""
    samples, file_rate = read_wav(path)
    return resample(samples, file_rate, rate, where=path)


def read_audio_records(path: str | os.PathLike, *, what: str = "audio data") -> list[dict]:
    """Records ``{"audio": Path, …}`` of speech data: each .wav file of a folder (sorted by name), or each line of a
    ``.jsonl`` file, whose ``audio`` field names a file (relative to the .jsonl's folder) and whose other fields
    (a ``target`` transcript) are kept as they are. Refuses a missing path, a folder without .wav files, or another
    kind of file."""
    from weightsmith import hf

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise ConfigError(f"{p}: no .wav files in the {what} folder")
        return [{"audio": f} for f in files]
    if not p.exists():
        raise ConfigError(f"{p}: {what} not found")
    if p.suffix != ".jsonl":
        raise ConfigError(f"{p}: {what} is a folder of .wav files or a .jsonl file naming them")
    records = hf.read_records(p, what=what, key="audio")
    return [{**r, "audio": p.parent / r["audio"]} for r in records]
