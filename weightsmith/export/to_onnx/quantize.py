"""Quantize: onnxruntime dynamic int8 of a float graph, and its quality figure against that graph."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from weightsmith.export.to_onnx.config import Int8Dynamic
from weightsmith.export.to_onnx.validate import mask_of, max_positions, ort_outputs, real_positions

# Text for the int8 check when the model has a tokenizer (random ids exaggerate activation outliers).
QUALITY_TEXT = (
    "The committee postponed its decision until the next meeting.",
    "Fresh bread smells wonderful early in the morning.",
    "How many moons does Jupiter have?",
    "The river flooded the valley after three days of rain.",
    "She solved the puzzle faster than anyone expected.",
    "Interest rates are likely to stay unchanged this year.",
    "A small dog barked at the delivery van.",
    "The algorithm sorts the list in linear time for small integers.",
)


def quantize_int8(src: Path, path: Path, scheme: Int8Dynamic, big: bool) -> Path:
    """onnxruntime ``quantize_dynamic``: weights as ``scheme.weights`` says (int8 kept to 7 bits, uint8, or full int8
    for VNNI CPUs), per output channel by default; activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path.parent.mkdir(parents=True, exist_ok=True)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process is for static (calibrated) quantization
    try:
        quantize_dynamic(
            src,
            path,
            per_channel=scheme.per_channel,
            weight_type=QuantType.QUInt8 if scheme.weights == "uint8" else QuantType.QInt8,
            reduce_range=scheme.weights == "int8",  # 7-bit codes; "int8-vnni" keeps all 8
            use_external_data_format=big,
        )
    finally:
        logging.disable(previous)
    return path


def text_inputs(tokenizer, config, input_names) -> dict[str, torch.Tensor] | None:
    """``QUALITY_TEXT`` through the model's tokenizer, padded; None without a tokenizer that pads."""
    if tokenizer is None or tokenizer.pad_token is None:
        return None
    batch = tokenizer(
        list(QUALITY_TEXT),
        padding=True,
        truncation=True,
        max_length=min(128, max_positions(config)),
        return_tensors="pt",
    )
    return {n: batch[n] for n in input_names} if all(n in batch for n in input_names) else None


def int8_quality(float_sess, int8_sess, inputs) -> dict[str, float]:
    """Per-position cosine (mean, min) and ‖q − f‖ / ‖f‖ of the int8 graph's outputs against the float graph's;
    for per-position outputs also the cosine of their mean over the non-pad positions (a sentence embedding).
    Every output counts (question answering's start and end logits, CLIP's scores and embeddings), except, beside
    others, one holding a single number per row (CLIP's scores for one image), whose cosine is only a sign."""
    cosines, pooled, err, norm = [], [], 0.0, 0.0
    for feeds in inputs:
        mask = mask_of(feeds)
        outputs = list(zip(ort_outputs(float_sess, feeds), ort_outputs(int8_sess, feeds)))
        for f_out, q_out in outputs:
            f = real_positions(torch.from_numpy(f_out).double(), mask)
            q = real_positions(torch.from_numpy(q_out).double(), mask)
            if len(outputs) > 1 and f.shape[1] == 1:
                continue
            cosines.append(torch.nn.functional.cosine_similarity(q, f, dim=-1))
            if f.shape[0] == int(mask.sum()):  # per-position rows: pool each sequence's rows
                owner = torch.arange(mask.shape[0]).repeat_interleave(mask.sum(1))  # (n,) row → sequence
                sums = [torch.zeros(mask.shape[0], f.shape[1], dtype=f.dtype).index_add_(0, owner, x) for x in (q, f)]
                pooled.append(torch.nn.functional.cosine_similarity(sums[0], sums[1], dim=-1))
            err += (q - f).pow(2).sum().item()
            norm += f.pow(2).sum().item()
    cos = torch.cat(cosines)
    quality = {
        "cosine_mean": round(cos.mean().item(), 6),
        "cosine_min": round(cos.min().item(), 6),
        "relative_error": round((err / norm) ** 0.5, 6),
    }
    if pooled:
        quality["pooled_cosine_mean"] = round(torch.cat(pooled).mean().item(), 6)
    return quality
