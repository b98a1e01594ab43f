"""``prune``: unstructured (magnitude per tensor or global, Wanda), N:M semi-structured, and structured pruning.

The method is a value (``methods``): ``prune(src, out, Magnitude(sparsity=0.5))`` finds the code that runs it in
``verb.RUNNERS`` by the config's type. Unstructured and N:M pruning write dense zeros (every tool loads them).
Magnitude pruning streams tensor by tensor and imports only torch and safetensors; Wanda and activation-scored
structured pruning build the transformers model once for calibration. Math lives in ``masks.py`` and
``structured.py``; calibration in ``wanda.py``. Importing this package stays light (no torch), so the CLI builds its
flags from the configs without importing torch.

>>> ws.prune("llama", "llama-50", Magnitude(sparsity=0.5, scope="global"))                # doctest: +SKIP
>>> ws.prune("minilm", "minilm-wanda", Wanda(sparsity=0.5, calibration="c.txt"))         # doctest: +SKIP
>>> ws.prune("llama", "llama-2of4", NM(n=2, m=4))                                         # doctest: +SKIP
>>> ws.prune("llama", "llama-small", StructuredFFN(ratio=0.25))                           # doctest: +SKIP
>>> ws.prune("llama", "llama-50", sparsity=0.5)          # the keyword form: make_method   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from weightsmith.compress.prune.methods import (
    CONFIGS,
    METHODS,
    NM,
    SCOPES,
    STRUCTURED,
    Magnitude,
    Method,
    StructuredFFN,
    StructuredHeads,
    Wanda,
    keyword_options,
    make_method,
)

if TYPE_CHECKING:
    from weightsmith.compress.prune import masks
    from weightsmith.compress.prune.unstructured import (
        DEFAULT_SKIP,
        PrunedView,
        check_sparsity,
        open_pruned,
        parse_pattern,
    )
    from weightsmith.compress.prune.verb import RUNNERS, prune

__all__ = [
    "CONFIGS",
    "DEFAULT_SKIP",
    "METHODS",
    "NM",
    "RUNNERS",
    "SCOPES",
    "STRUCTURED",
    "Magnitude",
    "Method",
    "PrunedView",
    "StructuredFFN",
    "StructuredHeads",
    "Wanda",
    "check_sparsity",
    "keyword_options",
    "make_method",
    "masks",
    "open_pruned",
    "parse_pattern",
    "prune",
]

# Names that import torch, loaded on first use.
_LAZY = {
    "prune": "verb",
    "RUNNERS": "verb",
    "open_pruned": "unstructured",
    "PrunedView": "unstructured",
    "DEFAULT_SKIP": "unstructured",
    "check_sparsity": "unstructured",
    "parse_pattern": "unstructured",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
