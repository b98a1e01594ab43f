"""``export onnx``: a transformers checkpoint as an ONNX graph, always validated with onnxruntime against PyTorch.

One module per job: ``config`` (the task registry and ``OnnxExport``, torch-free), ``build`` (the model and
``torch.onnx.export``), ``decoder`` (a causal LM with its KV cache), ``seq2seq`` (an encoder-decoder's three
graphs), ``generate`` (greedy loops through onnxruntime), ``validate`` (onnxruntime vs PyTorch), ``quantize``
(onnxruntime dynamic int8 and its quality figure), ``benchmark`` (opt-in latency), ``files`` (staging and
placement) and ``pipeline`` (the verb end to end). Importing this package imports neither torch nor onnx: the CLI
reads the config from here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from weightsmith.export.to_onnx.config import QUANTIZE, TASKS, Int8Dynamic, OnnxExport, Task, make_export

if TYPE_CHECKING:
    from weightsmith.checkpoint import TensorSource
    from weightsmith.report import Report

__all__ = ["QUANTIZE", "TASKS", "Int8Dynamic", "OnnxExport", "Task", "onnx"]


def onnx(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    config: OnnxExport | None = None,
    *,
    force: bool = False,
    **options: Any,
) -> Report:
    """Export ``src`` to the ONNX file ``out`` and validate it; the tokenizer and config go beside it.

    ``config``: an ``OnnxExport``; or its fields as ``options`` (``task``, ``opset``, ``quantize``, ``optimize``,
    ``atol``, ``benchmark``). Validation: onnxruntime vs PyTorch (float32) on batch {1, 8} × sequence {8, 128}
    (clipped to the model's positions), padded rows included, max |Δ| over non-pad positions; above ``atol`` the
    export is refused and nothing is written. ``quantize="int8"`` (``Int8Dynamic()``): onnxruntime
    ``quantize_dynamic`` (int8 weights kept to 7 bits per output channel, activations quantized per call:
    MatMulInteger), checked against the float graph by cosine and relative error ‖q − f‖ / ‖f‖ (on built-in
    sentences when there is a tokenizer); refused below a mean per-position cosine of ``min_cosine`` (0.98).
    ``optimize``: onnxruntime's extended graph optimizations (constant folding, fusions of LayerNorm, GELU,
    attention) saved into the file. ``benchmark``: median latency of ORT vs PyTorch eager at 8×128 with one thread
    each. The report gives opset, nodes, size and parity.

    >>> ws.export.onnx(  # doctest: +SKIP
    ...     "all-MiniLM-L6-v2/", "minilm/model.onnx", task="feature-extraction", quantize="int8")
    """
    from weightsmith.export.to_onnx.pipeline import run

    return run(src, out, make_export(config, **options), force)
