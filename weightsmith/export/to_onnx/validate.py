"""Validate: onnxruntime against PyTorch on padded batches; inputs, sessions and the comparisons they share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from weightsmith import architecture

VALIDATION_BATCHES = (1, 8)
VALIDATION_SEQUENCES = (8, 128)  # clipped to the model's max_position_embeddings


def max_positions(config) -> int:
    return architecture.max_positions(config if isinstance(config, dict) else config.to_dict())


def validation_shapes(config) -> list[tuple[int, int]]:
    limit = max_positions(config)
    sequences = sorted({min(s, limit) for s in VALIDATION_SEQUENCES})
    return [(b, s) for b in VALIDATION_BATCHES for s in sequences]


def example_inputs(config, input_names: Sequence[str], batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; right padding with rows shortened down to half length (row 0 full) when batch > 1."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 1009 + seq)
    feeds = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=gen)}
    lengths = [seq - (i * seq) // (2 * batch) for i in range(batch)]  # (batch,) from seq down to ~seq/2
    feeds["attention_mask"] = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {n: feeds[n] for n in input_names}


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_run(wrapper: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return wrapper(*feeds.values()).float()


def ort_run(sess, feeds: dict[str, torch.Tensor]):
    return sess.run(None, {n: t.numpy() for n, t in feeds.items()})[0]


def real_positions(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, …) outputs → the non-pad rows (n, features); pooled (batch, …) outputs → (batch, features)."""
    if output.dim() >= 3 and output.shape[:2] == mask.shape:
        return output[mask.bool()].reshape(int(mask.sum()), -1)
    return output.reshape(output.shape[0], -1)


def max_abs(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return (real_positions(got, mask) - real_positions(expected, mask)).abs().max().item()


def parity(wrapper: torch.nn.Module, sess, inputs: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict[str, float]:
    """Max |Δ| over non-pad positions of ORT vs PyTorch, per batch×sequence."""
    result = {}
    for (b, s), feeds in inputs.items():
        expected = torch_run(wrapper, feeds)
        got = torch.from_numpy(ort_run(sess, feeds))
        result[f"{b}x{s}"] = max_abs(got, expected, feeds["attention_mask"])
    return result
