"""GGUF (llama.cpp's file format): the architecture table shared by the exporter and the reader, and ``GGUFFile``,
a GGUF file read as transformers-named float tensors, dequantised one tensor at a time.

One table serves both directions: ``ARCHS`` maps a transformers ``model_type`` to its GGUF architecture and
conventions, ``LAYER_NAMES``/``GLOBAL_NAMES`` map module names. Conventions llama.cpp applies (and its
``convert_hf_to_gguf.py`` writes, and transformers' GGUF loader undoes):

- Llama-family q/k projections are stored with each head's rotary halves interleaved (``permute_qk``): llama.cpp's
  rope pairs adjacent rows, transformers' ``rotate_half`` pairs row j with row j + d/2.
- Gemma stores RMSNorm weights as 1 + w (its norm multiplies by (1 + w); llama.cpp's by w).
- Tensors are stored with numpy's row-major shape; GGUF's header lists dimensions innermost first (gguf-py reverses).

The ``gguf`` package (gguf-py) parses headers and dequantises; tensor bytes are read with positioned reads, so
memory stays at about one tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightsmith.checkpoint.files import TensorInfo, read_span
from weightsmith.errors import CheckpointError


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture is written in GGUF."""

    gguf: str  # general.architecture
    hf_class: str  # the transformers class a reader rebuilds (config "architectures")
    permute_qk: bool = False  # Llama-style rope: q/k rows interleaved per head
    norm_offset: float = 0.0  # GGUF norm weight = HF norm weight + offset (Gemma: 1)
    head_dim_keys: bool = False  # write attention.key_length / value_length (head_dim ≠ hidden / heads)


# transformers model_type → GGUF architecture (the families llama.cpp's converter writes the same way)
ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", permute_qk=True),
    "mistral": GGUFArch("llama", "MistralForCausalLM", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM"),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", head_dim_keys=True),
    "gemma": GGUFArch("gemma", "GemmaForCausalLM", norm_offset=1.0, head_dim_keys=True),
    "gemma2": GGUFArch("gemma2", "Gemma2ForCausalLM", norm_offset=1.0, head_dim_keys=True),
    "gemma3_text": GGUFArch("gemma3", "Gemma3ForCausalLM", norm_offset=1.0, head_dim_keys=True),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM"),
}
# GGUF architecture → the model_type a reader rebuilds (llama files are read as llama, Mistral included)
FROM_GGUF: dict[str, str] = {"llama": "llama", **{a.gguf: t for t, a in ARCHS.items() if a.gguf != "llama"}}

GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# module within model.layers.{i} → within blk.{i}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3's fused q/k/v
    "self_attn.q_norm": "attn_q_norm",  # Qwen3, Gemma 3
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused gate/up: llama.cpp splits it at run time
    "mlp.down_proj": "ffn_down",
}
# Gemma 2/3 norm around both sub-blocks: four norms per layer
_GEMMA_SANDWICH = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_FUSED_HF = ("self_attn.qkv_proj", "mlp.gate_up_proj")
_FUSED_GGUF = ("attn_qkv", "ffn_up")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")


def _layer_names(model_type: str) -> dict[str, str]:
    if model_type in ("gemma2", "gemma3_text"):
        return {**LAYER_NAMES, **_GEMMA_SANDWICH}
    return LAYER_NAMES


def to_gguf_name(name: str, model_type: str) -> str | None:
    """transformers tensor name → GGUF name (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``);
    None for a name the table does not know."""
    module, _, kind = name.rpartition(".")
    if module in GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{GLOBAL_NAMES[module]}.{kind}"
    m = _LAYER.match(name)
    if m is None:
        return None
    inner = _layer_names(model_type).get(m[2])
    return f"blk.{m[1]}.{inner}.{m[3]}" if inner else None


def from_gguf_name(name: str, model_type: str) -> str | None:
    """The inverse of ``to_gguf_name`` (``ffn_up`` is Phi-3's fused ``gate_up_proj``, elsewhere ``up_proj``)."""
    module, _, kind = name.rpartition(".")
    inverse_global = {v: k for k, v in GLOBAL_NAMES.items()}
    if module in inverse_global:
        return f"{inverse_global[module]}.{kind}"
    m = _BLOCK.match(name)
    if m is None:
        return None
    fused = model_type == "phi3"
    for hf, gg in _layer_names(model_type).items():
        if gg == m[2] and (gg not in _FUSED_GGUF or (hf in _FUSED_HF) == fused):
            return f"model.layers.{m[1]}.{hf}.{m[3]}"
    return None


def is_norm(name: str) -> bool:
    """A normalisation weight (Gemma's +1 applies to these only)."""
    return name.endswith(".weight") and bool(re.search(r"(norm|layernorm)\.weight$", name))


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers → llama.cpp row order for a q/k projection [heads·d, …] (weight or bias): within each head, the
    rows (j, j + d/2) become adjacent (2j, 2j + 1). ``w.reshape(n, 2, d/2, …).swapaxes(1, 2)`` as in llama.cpp's
    ``convert_hf_to_gguf.py`` (``LlamaModel.permute``)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_qk`` (what transformers' GGUF loader does to ``attn_q``/``attn_k``)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, config: dict) -> int | None:
    """How many heads a q/k projection ``hf_name`` is permuted over (query heads for q, key/value heads for k)."""
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(config["num_attention_heads"])
    if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _field_value(field: Any) -> Any:
    """A metadata field as a Python value (str, int, float, bool, or a list of them)."""
    import gguf

    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def config_from_metadata(meta: dict[str, Any], model_type: str, has_output: bool) -> dict:
    """A transformers config.json rebuilt from GGUF metadata (the keys llama.cpp's converter writes)."""
    arch = ARCHS[model_type]
    a = arch.gguf

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{a}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": not has_output,
    }
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch.permute_qk else None)
    if head_dim:
        config["head_dim"] = int(head_dim)
    theta = get("rope.freq_base")
    if theta is not None:
        config["rope_theta"] = _f32(theta)
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if vocab:
        config["vocab_size"] = int(vocab)
    for key, hf in (("attn_logit_softcapping", "attn_logit_softcapping"), ("final_logit_softcapping", None)):
        value = get(key)
        if value is not None:
            config[hf or key] = _f32(value)
    window = get("attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
    if model_type == "phi3":
        rope_dims = get("rope.dimension_count")
        if rope_dims:
            config["partial_rotary_factor"] = int(rope_dims) / (hidden // heads)
        orig = get("rope.scaling.original_context_length")
        if orig:
            config["original_max_position_embeddings"] = int(orig)
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("padding_token_id", None)):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf or "pad_token_id"] = int(value)
    return config


class GGUFFile:
    """One ``.gguf`` file read as the transformers checkpoint it stands for: tensors renamed to transformers' names,
    dequantised to float32 (F16/BF16/F32 stay as stored), q/k rows and Gemma's norms undone, one tensor per read.

    ``metadata`` is empty (GGUF has no safetensors metadata); ``gguf_metadata`` holds the file's key/values (token
    lists left out), ``ggml_types`` each tensor's stored type, ``config`` the rebuilt config.json.
    """

    def __init__(self, path: Path, label: str):
        import gguf

        self.path, self.label = path, label
        self.metadata: dict[str, str] = {}
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, OSError, IndexError) as exc:  # gguf-py raises ValueError on bad magic/version
            raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from None
        meta = {key: _field_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        self.tokenizer_metadata = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        self.gguf_metadata = {k: v for k, v in meta.items() if not isinstance(v, list) or len(v) <= 64}
        arch = meta.get("general.architecture")
        model_type = FROM_GGUF.get(str(arch))
        if model_type is None:
            raise CheckpointError(
                f"{path}: GGUF architecture {arch!r} is not one weightsmith maps back to transformers "
                f"(supported: {', '.join(sorted(FROM_GGUF))})"
            )
        self.model_type, self.arch = model_type, ARCHS[model_type]
        self._tokenizer_dir: Path | None = None
        tensors = list(reader.tensors)
        self.config = config_from_metadata(meta, model_type, any(t.name == "output.weight" for t in tensors))
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        self._stored: dict[str, tuple[str, Any, tuple[int, ...], int, int]] = {}
        self.ggml_types: dict[str, str] = {}
        size = path.stat().st_size
        for t in tensors:
            hf = from_gguf_name(t.name, model_type)
            if hf is None:
                raise CheckpointError(
                    f"{path}: tensor {t.name!r} has no transformers name for architecture {arch!r} "
                    f"(weightsmith reads {', '.join(sorted(FROM_GGUF))} files with their standard tensors)"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the innermost dimension first
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            offset, nbytes = int(t.data_offset), int(t.n_bytes)
            if offset + nbytes > size:
                raise CheckpointError(f"{path}: truncated: tensor {t.name!r} ends at byte {offset + nbytes} of {size}")
            dtype = _STORED_DTYPES.get(qtype.name, torch.float32)
            self.entries[hf] = (TensorInfo(hf, shape, dtype, label), offset, offset + nbytes)
            self._stored[hf] = (t.name, qtype, shape, offset, nbytes)
            self.ggml_types[hf] = qtype.name

    def names(self) -> list[str]:
        return list(self.entries)

    def tokenizer_files(self) -> list[Path]:
        """The file's vocabulary as transformers tokenizer files (tokenizer.json, tokenizer_config.json, chat
        template), rebuilt once by transformers' GGUF tokenizer converter into a temporary directory removed at exit;
        [] when the file has no vocabulary or transformers cannot rebuild it. Imports transformers (seconds)."""
        if self._tokenizer_dir is None:
            self._tokenizer_dir = self._rebuild_tokenizer()
        return sorted(self._tokenizer_dir.iterdir()) if self._tokenizer_dir else []

    def _rebuild_tokenizer(self) -> Path | None:
        if "tokenizer.ggml.tokens" not in self.tokenizer_metadata:
            return None
        import atexit
        import shutil
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="weightsmith-gguf-tokenizer-"))
        atexit.register(shutil.rmtree, out, True)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name).save_pretrained(out)
        except (ImportError, ValueError, KeyError, OSError, TypeError):  # a vocabulary transformers cannot convert
            shutil.rmtree(out, ignore_errors=True)
            return None
        return out

    def gguf_name(self, name: str) -> str:
        return self._stored[name][0]

    def read_raw(self, name: str) -> np.ndarray:
        """The stored bytes of ``name`` (quantised blocks as they are), by one positioned read."""
        _, _, _, offset, nbytes = self._stored[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        read_span(self.path, offset, buf, lambda fd: None, f"tensor {name!r}")
        return buf.numpy()

    def read(self, name: str) -> torch.Tensor:
        import gguf

        gname, qtype, shape, _, _ = self._stored[name]
        raw = self.read_raw(name)
        info = self.entries[name][0]
        if qtype.name in _STORED_DTYPES:
            t = torch.from_numpy(raw).view(info.dtype).reshape(shape)
        else:
            blocks = raw.reshape(*shape[:-1], -1)  # dequantize reads rows of blocks
            t = torch.from_numpy(np.ascontiguousarray(gguf.dequantize(blocks, qtype), dtype=np.float32))
            t = t.reshape(shape)
        heads = qk_heads(name, self.config) if self.arch.permute_qk else None
        if heads is not None:
            t = unpermute_qk(t, heads).contiguous()
        if self.arch.norm_offset and is_norm(name):
            t = (t.float() - self.arch.norm_offset).to(info.dtype)
        return t
