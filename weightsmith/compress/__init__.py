"""Compression verbs that rewrite a checkpoint into fewer bytes: quantization (``weightsmith.compress.quantize``)."""
