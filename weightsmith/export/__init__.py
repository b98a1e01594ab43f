"""Export: ONNX graphs validated against PyTorch (``onnx``), clean safetensors directories (``safetensors``).

The modules are ``to_onnx`` and ``to_safetensors`` so that ``ws.export.onnx`` and ``ws.export.safetensors`` stay
the verbs (a module of the same name would shadow them, as ``convert`` once did). Neither imports transformers,
onnx or onnxruntime until an ONNX export runs.
"""

from weightsmith.export.to_onnx import onnx
from weightsmith.export.to_safetensors import safetensors

__all__ = ["onnx", "safetensors"]
