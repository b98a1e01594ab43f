"""Export: ONNX graphs validated against PyTorch (``onnx``), clean safetensors directories (``safetensors``), GGUF
files for llama.cpp (``gguf``).

The modules are ``to_onnx``, ``to_safetensors`` and ``to_gguf`` so that ``ws.export.onnx`` etc. stay
the verbs (a module of the same name would shadow them, as ``convert`` once did). The verbs are imported on first
use, so that the CLI can read ``to_onnx``'s torch-free config without importing torch; none imports transformers,
onnx or onnxruntime until an ONNX export runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.export.to_gguf import gguf
    from weightsmith.export.to_onnx import onnx
    from weightsmith.export.to_safetensors import safetensors

__all__ = ["gguf", "onnx", "safetensors"]
_MODULES = {"gguf": "to_gguf", "onnx": "to_onnx", "safetensors": "to_safetensors"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"weightsmith.export.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
