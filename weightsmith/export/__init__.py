"""Export: ONNX graphs validated against PyTorch (``onnx``), clean safetensors directories (``safetensors``), GGUF
files for llama.cpp (``gguf``).

The modules are ``to_onnx``, ``to_safetensors`` and ``to_gguf`` so that ``ws.export.onnx`` etc. stay
the verbs (a module of the same name would shadow them, as ``convert`` once did). Neither imports transformers,
onnx or onnxruntime until an ONNX export runs.
"""

from weightsmith.export.to_gguf import gguf
from weightsmith.export.to_onnx import onnx
from weightsmith.export.to_safetensors import safetensors

__all__ = ["gguf", "onnx", "safetensors"]
