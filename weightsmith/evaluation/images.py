"""Quality of an image classifier on an image folder: accuracy against the folder's classes and, against a
reference model, top-1 agreement, KL and max |Δ| of the logits.

The folder is laid out as torchvision's ImageFolder (``class_name/*.png``); images are prepared by the checkpoint's
own image processor (preprocessor_config.json), so the model sees what it was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path

from weightsmith import hf
from weightsmith.errors import ConfigError


def class_targets(config: dict, classes: list[str]) -> list[int]:
    """The model's class id for each folder class: by name where every folder is one of the model's labels
    (``id2label``), else by position (the ImageFolder order: the i-th sorted folder is class i)."""
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    by_name = {v: k for k, v in id2label.items()}
    if all(c in by_name for c in classes):
        return [by_name[c] for c in classes]
    if id2label and len(classes) > len(id2label):
        raise ConfigError(f"{len(classes)} class folders, but the model has {len(id2label)} classes")
    return list(range(len(classes)))


def logits(path: Path, pixels, *, batch_size: int = 32):
    """(N, classes) float32 logits of a checkpoint directory (transformers) or an ONNX file (onnxruntime)."""
    import torch

    rows = []
    if path.suffix == ".onnx":
        session = hf.ort_session(path)
        name = session.get_inputs()[0].name
        for start in range(0, len(pixels), batch_size):
            rows.append(torch.from_numpy(session.run(None, {name: pixels[start : start + batch_size].numpy()})[0]))
    else:
        model = hf.load_model(path)
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                rows.append(model(pixel_values=pixels[start : start + batch_size]).logits)
    return torch.cat(rows).float()


def evaluate_images(path: Path, data: str | os.PathLike, ref: str | os.PathLike | None, *, batch_size: int = 32):
    """accuracy = mean[argmax f(x) = y] over the folder's images; with ``ref`` also the reference's accuracy,
    agreement = mean[argmax f(x) = argmax f_ref(x)], KL(p_ref ‖ p_model) per image and max |Δ| of the logits."""
    import torch

    from weightsmith.report import Report

    model_dir = path.parent if path.suffix == ".onnx" else path
    config = hf.read_config(model_dir)
    images, labels, classes = hf.read_image_folder(data, what="evaluation images")
    source = model_dir if (model_dir / "preprocessor_config.json").is_file() or ref is None else Path(ref)
    pixels = hf.pixel_values(hf.load_image_processor(source), images)
    targets = torch.tensor(class_targets(config, classes))[torch.tensor(labels)]
    report = Report("eval")
    with report.timed("run"):
        out = logits(path, pixels, batch_size=batch_size)
        other = logits(Path(ref), pixels, batch_size=batch_size) if ref is not None else None
    report.summary.update(
        model=str(path),
        kind="image classification",
        runtime="onnxruntime" if path.suffix == ".onnx" else "transformers",
        images=len(labels),
        classes=len(classes),
        accuracy=float((out.argmax(-1) == targets).float().mean()),
    )
    if other is not None:
        if other.shape != out.shape:
            raise ConfigError(f"{path}: {out.shape[1]} classes, the reference {ref} has {other.shape[1]}")
        log_p, log_q = other.log_softmax(-1), out.log_softmax(-1)
        report.summary.update(
            ref=str(ref),
            ref_accuracy=float((other.argmax(-1) == targets).float().mean()),
            agreement=float((out.argmax(-1) == other.argmax(-1)).float().mean()),
            kl_per_image=float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
            max_abs=float((out - other).abs().max()),
        )
    return report
