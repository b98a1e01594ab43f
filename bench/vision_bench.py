"""Vision bench, offline: scikit-learn's 8×8 digits through the whole pipeline on a small ViT.

A ViT (4 layers, width 64, 16×16 input in 4×4 patches: the digits are upscaled by the checkpoint's own image
processor) is trained from scratch on the first half of the digits, then fine-tuned with a PEFT LoRA adapter on the
next quarter; the last quarter is held out. The pipeline runs through the CLI, each step in a fresh process:
fold (`weightsmith lora merge`) → prune (`weightsmith prune`, magnitude 50%) → int8 (`weightsmith quantize`) →
ONNX (`weightsmith export onnx --task image-classification`). Each stage reports held-out accuracy and agreement
with the folded model (`weightsmith eval` on the image folder), weight bytes on disk and CPU latency of one image
(one thread, median of 200 runs after warm-up). A step the CLI refuses is recorded as not available.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two shared cores: spinning OpenMP workers slow everything

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from _common import PY, WORK, measure, table, write_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _distill_utils import write_preprocessor  # noqa: E402

import weightsmith as ws  # noqa: E402
from weightsmith import hf  # noqa: E402

ROOT = WORK / "vision"
SIZE = 16
PRETRAIN_EPOCHS, LORA_EPOCHS, BATCH = 60, 20, 64  # about a minute of training on 2 cores
LATENCY_RUNS = 50


def _split_folders() -> dict[str, Path]:
    """The digits as class_name/*.png folders: pretrain (1/2), finetune (1/4), test (1/4), a fixed shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 → 0..255
    order = np.random.default_rng(0).permutation(len(images))
    n = len(order)
    parts = {"pretrain": order[: n // 2], "finetune": order[n // 2 : 3 * n // 4], "test": order[3 * n // 4 :]}
    folders = {}
    for split, indices in parts.items():
        folder = ROOT / split
        for i in indices:
            (folder / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
            hf.write_png(folder / str(digits.target[i]) / f"{i:04d}.png", images[i])
        folders[split] = folder
    return folders


def _tensors(folder: Path, processor) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = hf.read_image_folder(folder)
    return hf.pixel_values(processor, images), torch.tensor(labels)


def _train(model, pixels, labels, epochs: int, lr: float) -> None:
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(labels) // BATCH)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels))
        for start in range(0, len(labels), BATCH):
            idx = perm[start : start + BATCH]
            loss = model(pixel_values=pixels[idx], labels=labels[idx]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    model.eval()


def _base_and_adapter(folders: dict[str, Path]) -> tuple[Path, Path, float, float]:
    """Train the base from scratch and a LoRA adapter on top; returns their paths and training seconds."""
    import peft

    base_dir, adapter_dir = ROOT / "base", ROOT / "adapter"
    config = tf.ViTConfig(
        image_size=SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    torch.manual_seed(0)
    model = tf.ViTForImageClassification(config)
    model.save_pretrained(base_dir)
    write_preprocessor(base_dir, SIZE)  # ViTImageProcessor's own file (the class itself needs PIL)
    processor = hf.load_image_processor(base_dir)
    pixels, labels = _tensors(folders["pretrain"], processor)
    t = time.perf_counter()
    _train(model, pixels, labels, PRETRAIN_EPOCHS, 3e-3)
    pretrain_s = time.perf_counter() - t
    model.save_pretrained(base_dir)
    lora = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "fc1", "fc2"], lora_dropout=0.0
    )
    tuned = peft.get_peft_model(tf.ViTForImageClassification.from_pretrained(base_dir), lora)
    pixels, labels = _tensors(folders["finetune"], processor)
    t = time.perf_counter()
    _train(tuned, pixels, labels, LORA_EPOCHS, 3e-3)
    lora_s = time.perf_counter() - t
    tuned.save_pretrained(adapter_dir)
    # PEFT's own fold, the fallback when `weightsmith lora merge` refuses (recorded in the table's notes)
    tuned.merge_and_unload().save_pretrained(ROOT / "peft-folded")
    shutil.copy(base_dir / "preprocessor_config.json", ROOT / "peft-folded" / "preprocessor_config.json")
    return base_dir, adapter_dir, pretrain_s, lora_s


def _cli(*args: str) -> tuple[float, str | None]:
    """Run `weightsmith ARGS` in a fresh process; (seconds, None) or (seconds, the refusal's last line)."""
    cmd = [PY, "-m", "weightsmith.cli", *args, "--force"]
    try:
        return measure(cmd).seconds, None
    except RuntimeError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return float("nan"), lines[-1][:160] if lines else "failed"


def _weight_bytes(path: Path) -> int:
    if path.suffix == ".onnx":
        return sum(f.stat().st_size for f in path.parent.iterdir() if f.suffix in (".onnx", ".data"))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _latency_ms(path: Path, pixels: torch.Tensor) -> float:
    """Median milliseconds per single-image forward (one thread)."""
    torch.set_num_threads(1)
    one = pixels[:1]
    if path.suffix == ".onnx":
        session = hf.ort_session(path)
        name = session.get_inputs()[0].name

        def run():
            session.run(None, {name: one.numpy()})
    else:
        model = hf.load_model(path)

        def run():
            with torch.no_grad():
                model(pixel_values=one)

    for _ in range(20):
        run()
    times = []
    for _ in range(LATENCY_RUNS):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    folders = _split_folders()
    base, adapter, pretrain_s, lora_s = _base_and_adapter(folders)
    test = folders["test"]
    pixels, _ = _tensors(test, hf.load_image_processor(base))
    folded, pruned, int8, onnx_dir = ROOT / "folded", ROOT / "pruned", ROOT / "int8", ROOT / "onnx"
    fold_s, fold_refused = _cli("lora", "merge", str(base), str(adapter), "-o", str(folded))
    steps = [("base (pretrained)", base, 0.0, None), ("+ LoRA folded", folded, fold_s, fold_refused)]
    if fold_refused is not None:  # go on from PEFT's fold, so the later stages are still measured
        shutil.copytree(ROOT / "peft-folded", folded, dirs_exist_ok=True)
        steps.append(("+ LoRA folded by PEFT (fallback)", folded, float("nan"), None))
    steps += [
        ("+ pruned 50% (magnitude)", pruned, *_cli("prune", str(folded), "-o", str(pruned), "--sparsity", "0.5")),
        ("+ int8 (W8A8 dynamic)", int8, *_cli("quantize", str(pruned), "-o", str(int8), "--scheme", "int8")),
    ]
    onnx_file = onnx_dir / "model.onnx"  # `-o` names the graph; config and image processor go beside it
    seconds, refused = _cli("export", "onnx", str(pruned), "-o", str(onnx_file), "--task", "image-classification")
    steps.append(("pruned → ONNX (onnxruntime)", onnx_file, seconds, refused))
    rows, notes = [], []
    for label, path, secs, refusal in steps:
        if refusal is not None or not path.exists():
            rows.append([label, "n/a", "n/a", "n/a", "n/a", "n/a"])
            notes.append(f"{label}: not available here ({refusal or 'no output'})")
            continue
        s = ws.evaluate(path, test, ref=folded if folded.exists() else None).summary
        rows.append(
            [
                label,
                f"{s['accuracy']:.4f}",
                f"{s.get('agreement', float('nan')):.4f}",
                f"{_weight_bytes(path) / 1e6:.3f}",
                f"{_latency_ms(path, pixels):.3f}",
                f"{secs:.1f}" if secs == secs else "",
            ]
        )
    _write(rows, notes, pretrain_s, lora_s, folders)


def _write(rows, notes, pretrain_s: float, lora_s: float, folders: dict[str, Path]) -> None:
    counts = {k: sum(1 for _ in v.glob("*/*.png")) for k, v in folders.items()}
    header = ["stage", "test accuracy", "agreement with folded", "weights MB", "latency ms/image", "step s"]
    text = "\n".join(
        [
            "## Vision pipeline on digits (`bench/vision_bench.py`)",
            "",
            f"scikit-learn's 8×8 digits (pretrain {counts['pretrain']}, LoRA fine-tune {counts['finetune']}, "
            f"test {counts['test']} images), upscaled to 16×16 by the ViT image processor; ViT 4 layers × 64 wide "
            f"trained from scratch ({PRETRAIN_EPOCHS} epochs, {pretrain_s:.0f} s), PEFT LoRA r=8 on q/v/o "
            "projections and the MLP "
            f"({LORA_EPOCHS} epochs, {lora_s:.0f} s). Every later stage is a `weightsmith` command in a fresh process "
            "(step s: its wall time); accuracy and agreement from `weightsmith eval` on the test folder; latency of "
            f"one image on one thread, median of {LATENCY_RUNS}.",
            "",
            table(header, rows),
            "",
            *(f"- {n}" for n in notes),
        ]
    )
    write_section("vision", text)


if __name__ == "__main__":
    sys.exit(main())
