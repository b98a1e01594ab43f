"""weightsmith: streaming checkpoint surgery.

    import weightsmith as ws
    ckpt = ws.open("model_dir")                  # lazy tensor dict
    ws.convert("model_dir", "out", dtype="bf16")  # every verb writes atomically and returns a Report

Attributes load lazily so that ``import weightsmith`` (and ``weightsmith --help``) stays free of torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_EXPORTS = {
    "open": ("weightsmith.checkpoint", "open"),
    "save": ("weightsmith.checkpoint", "save"),
    "Checkpoint": ("weightsmith.checkpoint", "Checkpoint"),
    "CheckpointWriter": ("weightsmith.checkpoint", "CheckpointWriter"),
    "inspect": ("weightsmith.inspection", "inspect"),
    "diff": ("weightsmith.inspection", "diff"),
    "convert": ("weightsmith.conversion", "convert"),
    "verify": ("weightsmith.verification", "verify"),
    "lora": ("weightsmith.merge.lora", None),
    "prune": ("weightsmith.compress.prune", "prune"),
    "distill": ("weightsmith.compress.distill", "distill"),
    "quantize": ("weightsmith.compress.quantize", "quantize"),
    "dequantize": ("weightsmith.compress.quantize", "dequantize"),
    "merge": ("weightsmith.merge", None),
    "export": ("weightsmith.export", None),
    "run": ("weightsmith.recipe", "run"),
    "evaluate": ("weightsmith.evaluation", "evaluate"),
    "Report": ("weightsmith.report", "Report"),
    "collecting_figures": ("weightsmith.report", "collecting_figures"),
    "write_html": ("weightsmith.report_html", "write_html"),
    "WeightsmithError": ("weightsmith.errors", "WeightsmithError"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    return getattr(value, attr) if attr else value
