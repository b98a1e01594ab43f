"""Benchmark (opt-in): median latency of PyTorch eager and the written graph(s) at 8×128, fixed threads."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightsmith import hf
from weightsmith.export.to_onnx.validate import example_inputs, max_positions, ort_run, torch_run

LATENCY_THREADS = 1  # fixed for torch and onnxruntime: with 2 shared cores more threads only add noise
LATENCY_REPEATS = 3  # after one warm-up run; the median of three


def median_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first-call allocations and ORT's lazy initialisation
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def latency(wrapper: torch.nn.Module, final_path: Path, float_path: Path | None, config, input_names) -> dict:
    """Median latency of PyTorch eager, the written graph (and the float graph when int8) at 8×128, fixed threads."""
    seq = min(128, max_positions(config))
    feeds = example_inputs(config, input_names, 8, seq, seed=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        result: dict[str, Any] = {
            "shape": f"8x{config.image_size}²" if "pixel_values" in input_names else f"8x{seq}",
            "threads": LATENCY_THREADS,
            "torch_eager": median_ms(lambda: torch_run(wrapper, feeds)),
        }
    finally:
        torch.set_num_threads(previous)
    graphs = {"ort_float": float_path, "ort_int8": final_path} if float_path else {"ort_float": final_path}
    for key, path in graphs.items():
        sess = hf.ort_session(path, threads=LATENCY_THREADS)
        result[key] = median_ms(functools.partial(ort_run, sess, feeds))
    result["ort_speedup_vs_torch"] = round(result["torch_eager"] / result[list(graphs)[-1]], 3)
    return result
