"""Quality of a speech recogniser (Whisper, or any encoder-decoder whose encoder reads ``input_features``) against
a reference model's own transcripts, measured as ``evaluation.seq2seq`` measures text-to-text models: the reference
writes its greedy transcript of each audio file, the model reads it teacher-forced, and we count token agreement
and the cross-entropy of the reference's tokens under the model (with the reference: KL per token, its ce, max |Δ|).

Audio comes from ``weightsmith.audio`` (PCM 16-bit .wav, mono, resampled to the feature extractor's rate) and is
turned into features by the checkpoint's own feature extractor (preprocessor_config.json; the reference's when the
model has none). The decoder prompt is the generation config's (``decoder_prompt``); transcripts are greedy
continuations of it through transformers' generic ``GenerationMixin.generate``, which applies the generation
config's token suppression but not Whisper's long-form, timestamp or temperature-fallback logic.

>>> ws.evaluate("whisper-int8/", "clips/", ref="whisper-tiny/").summary          # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from weightsmith import audio, hf
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.evaluation.seq2seq import Example, score, summarise


def speech_features(extractor, path: str | os.PathLike):
    """(1, mel bins, frames) float32 features of one .wav file, read at the extractor's ``sampling_rate`` (padded or
    cut to the extractor's window: 30 s for Whisper)."""
    samples = audio.load_audio(path, extractor.sampling_rate)
    return extractor(samples, sampling_rate=extractor.sampling_rate, return_tensors="pt")["input_features"].float()


def _detect_language(model, features, start: int, languages: dict[str, int]) -> int:
    """The language token the model scores highest right after the start token (Whisper's language detection)."""
    import torch

    ids = sorted(languages.values())
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor([[start]])).logits[0, -1]
    return ids[int(logits[ids].argmax())]


def decoder_prompt(model, features) -> list[int]:
    """The decoder prompt a transcript follows, from the generation config: the decoder start token, then the
    ``forced_decoder_ids`` in position order (language, task), then ``no_timestamps_token_id`` where the config has
    one. A multilingual config (``lang_to_id``) with nothing forced gets (language, "transcribe"); a language left
    open (``null``) is the one the model scores highest after the start token. Deterministic for a given model and
    audio file."""
    gen, config = model.generation_config, model.config
    start = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else config.decoder_start_token_id
    if start is None:
        raise CheckpointError(f"{config.name_or_path}: the model names no decoder start token")
    forced = getattr(gen, "forced_decoder_ids", None) or getattr(config, "forced_decoder_ids", None) or []
    languages = getattr(gen, "lang_to_id", None) or {}
    if languages and not forced:
        task = (getattr(gen, "task_to_id", None) or {}).get("transcribe")
        forced = [[1, None]] + ([[2, task]] if task is not None else [])
    prompt = [start]
    for _, token in sorted(forced, key=lambda pair: pair[0]):
        if token is None:
            if not languages:
                raise CheckpointError(f"{config.name_or_path}: the generation config leaves the language open "
                                      "and has no lang_to_id to detect it")  # fmt: skip
            token = _detect_language(model, features, start, languages)
        prompt.append(int(token))
    no_timestamps = getattr(gen, "no_timestamps_token_id", None)
    if no_timestamps is not None and no_timestamps not in prompt:
        prompt.append(int(no_timestamps))
    return prompt


def greedy_transcript(model, features, prompt: list[int], *, max_new_tokens: int) -> list[int]:
    """The model's greedy continuation of ``prompt`` (without it), up to and including EOS."""
    import torch
    from transformers import GenerationMixin

    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    with torch.no_grad():
        out = GenerationMixin.generate(  # the generic loop: Whisper's own generate rewrites the prompt
            model,
            input_features=features,
            decoder_input_ids=torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
    row = out[0, len(prompt) :].tolist()
    end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
    return row[: end + 1]


def _extractor_dir(path: Path, ref: str | os.PathLike | None) -> Path:
    """The model's own feature extractor, or the reference's when the model has none beside it."""
    if (path / "preprocessor_config.json").is_file() or ref is None:
        return path
    return Path(ref)


def transcript_ids(tokenizer, text: str, max_length: int) -> list[int]:
    """A transcript's token ids without special tokens, cut to ``max_length − 1``, then the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CheckpointError(
            f"{tokenizer.name_or_path}: the tokenizer has no end-of-sequence token to end a transcript"
        )
    return tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - 1] + [eos]


def _data_targets(records: list[dict], model_dir: Path, data, max_length: int) -> list[list[int]]:
    """Token ids of the data's ``target`` transcripts when there is no reference: the model's tokenizer reads them."""
    if not all(isinstance(r.get("target"), str) for r in records):
        raise ConfigError(f"{data}: without `ref` every audio file needs a 'target' transcript (a .jsonl field)")
    tokenizer = hf.load_tokenizer(model_dir)
    return [transcript_ids(tokenizer, r["target"], max_length) for r in records]


def _examples(model, reference, extractor, files: list[Path], targets: list[list[int]] | None, max_length: int):
    """One Example per audio file, its features computed as it comes (one file's features in memory at a time): the
    prompt from the reference (or the model) and the reference's greedy transcript (or the data's target)."""
    writer = reference if reference is not None else model
    room = int(getattr(model.config, "max_target_positions", None) or max_length + 8)
    for i, file in enumerate(files):
        f = speech_features(extractor, file)
        prompt = decoder_prompt(writer, f)
        new = min(max_length, room - len(prompt))
        if targets is not None:
            target = targets[i][:new]
        else:
            target = greedy_transcript(reference, f, prompt, max_new_tokens=new)
        yield Example({"input_features": f}, prompt, target)


def evaluate_speech(path: Path, data: str | os.PathLike, ref: str | os.PathLike | None, max_length: int):
    """agreement = mean over transcript tokens of [greedy choice of p_model(·|audio, prompt, y<t) = y_t],
    ce = mean −log p_model(y_t|audio, prompt, y<t), where y is the reference's greedy transcript (or the data's
    ``target``); with ``ref`` also KL(p_ref ‖ p_model) per token, the reference's ce and max |Δ| of the logits."""
    from weightsmith.report import Report

    if path.suffix == ".onnx":
        raise ConfigError(f"{path}: speech evaluation runs on checkpoint directories, not ONNX files")
    records = audio.read_audio_records(data, what="evaluation audio")
    extractor = hf.load_feature_extractor(_extractor_dir(path, ref))
    targets = _data_targets(records, path, data, max_length) if ref is None else None
    files = [Path(r["audio"]) for r in records]
    for file in files:  # every header checked before any model loads; the samples are read one file at a time
        audio.check_wav(file, extractor.sampling_rate)
    model = hf.load_model(path)
    reference = hf.load_model(ref) if ref is not None else None
    report = Report("eval")
    with report.timed("run"):
        sums = score(model, reference, _examples(model, reference, extractor, files, targets, max_length))
    report.summary.update(
        model=str(path),
        kind="speech",
        runtime="transformers",
        audio_files=len(records),
        sampling_rate=extractor.sampling_rate,
    )
    summarise(report, sums, data, ref)
    return report
