"""``export gguf``: a transformers checkpoint as one GGUF file for llama.cpp (and Ollama, LM Studio…), through gguf-py's
``GGUFWriter`` — the llama.cpp project's own writer.

Streamed: the header, metadata and tensor infos are written first (every tensor's type and byte count is known from
its shape), then each tensor is read, transformed and appended, quantised a chunk of rows at a time; memory stays at
one tensor as stored plus a 16 MB float32 chunk. The file is written beside the destination and renamed into place
at the end.

Types are llama.cpp's ``--outtype`` values: f32, f16, bf16 and the block quantisations gguf-py computes (q8_0,
q4_0, q4_1, q5_0, q5_1; 32 weights per block). Norms and biases stay f32, as llama.cpp keeps them; a 2-D weight whose
rows are not a whole number of blocks is written f16 (named in the report).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightsmith.checkpoint import TensorSource, check_destination
from weightsmith.checkpoint.gguf_file import ARCHS, is_norm, permute_qk, qk_heads, to_gguf_name
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError, DestinationError, IncompatibleError, NumericalError
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.units import format_size

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_FILE_TYPES = {  # llama.cpp's general.file_type for each --outtype (gguf.LlamaFileType)
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
}


def gguf(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    type: str = "f16",  # noqa: A002 - llama.cpp's name for it (--outtype)
    force: bool = False,
) -> Report:
    """Write ``src`` (a Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3 or Phi-3 causal LM) as the GGUF file ``out``.

    Metadata: the architecture's hyper-parameters as llama.cpp reads them, and the tokenizer found beside the
    weights (vocabulary, merges or scores, token types, special tokens, chat template). A quantized input
    (compressed-tensors int8, NF4) is dequantised first. The report lists each tensor's GGUF name, type and, for
    block types, ‖W − Q(W)‖/‖W‖.

    >>> ws.export.gguf("llama", "llama-q8_0.gguf", type="q8_0")  # doctest: +SKIP
    """
    import gguf as gg

    from weightsmith.compress.quantize.dequantize import float_view
    from weightsmith.export.gguf_vocab import read_vocab, write_vocab

    kind = str(type).lower()
    if kind not in TYPES:
        raise ConfigError(f"gguf: type {type!r} is not one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise DestinationError(f"{out}: a directory; give the .gguf file to write")
    check_destination(out, force)
    source, config, model_type, arch = _source(src)
    ckpt = float_view(source)
    names = _gguf_names(ckpt, source.path, model_type)
    plans, fallbacks, block = _plans(gg, ckpt, names, kind)
    vocab = read_vocab(source.root, model_type, int(config.get("vocab_size") or 0)) if source.path.is_dir() else None

    report = Report("export gguf", output=str(out))
    _make_parent(out)
    tmp = out.parent / f".{out.name}.weightsmith-{uuid.uuid4().hex[:8]}"
    rows = []
    with report.timed("total"):
        writer = gg.GGUFWriter(tmp, arch.gguf)
        try:
            _write_metadata(writer, gg, config, arch, source, kind)
            if vocab is not None:
                write_vocab(writer, vocab)
            _write_special_ids(writer, config, vocab)
            _write_tensor_infos(writer, names, plans)
            for name in progress(list(names), desc=f"export gguf {kind}"):
                rows.append(
                    _write_tensor(gg, writer, source.path, name, names[name], ckpt[name], plans[name], arch, config)
                )
            writer.close()
            check_destination(out, force)  # again: something may have appeared while we worked
            os.replace(tmp, out)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    if fallbacks:
        report.notes.append(
            f"{len(fallbacks)} weight(s) written F16: rows not a multiple of {block} (e.g. {fallbacks[0]})"
        )
    _summarise(report, source, ckpt, arch, kind, rows, vocab)
    report.tensors = rows
    return report


def _write_tensor_infos(writer: Any, names: dict[str, str], plans: dict[str, Any]) -> None:
    """Every tensor's name, shape and type, then the header, metadata and tensor table, before any data."""
    for name, target in names.items():
        t, shape, nbytes = plans[name]
        writer.add_tensor_info(target, shape, np.dtype(np.float32), nbytes, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _summarise(
    report: Report, source: TensorSource, ckpt: Any, arch: Any, kind: str, rows: list[dict[str, Any]], vocab: Any
) -> None:
    """The export's headline (sizes, tokenizer, errors of block types) and its note on a missing vocabulary."""
    size = Path(report.output or "").stat().st_size
    errors = [r["rel_error"] for r in rows if "rel_error" in r]
    report.summary.update(
        source=str(source.path),
        architecture=arch.gguf,
        type=kind,
        tensors=len(rows),
        bytes_in=ckpt.nbytes,
        bytes_out=size,
        size_in=format_size(ckpt.nbytes),
        size_out=format_size(size),
        tokenizer=f"{vocab.model} ({len(vocab.tokens)} tokens)" if vocab else None,
        chat_template=bool(vocab and vocab.chat_template),
    )
    if errors:
        report.summary.update(rel_error_mean=sum(errors) / len(errors), rel_error_max=max(errors))
    if vocab is None:
        report.notes.append("no tokenizer.json beside the weights: the file has no vocabulary, llama.cpp needs one")


def _make_parent(out: Path) -> None:
    """The destination's folder, made as the checkpoint writer makes its output's; a parent that is a file refused."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DestinationError(f"{out}: cannot write here (a parent is a file)") from None


def _source(src: TensorSource | str | os.PathLike) -> tuple[TensorSource, dict, str, Any]:
    """The checkpoint to export, its config, model type and GGUF architecture; refused when it has none."""
    source = as_checkpoint(src)
    if source.is_adapter:
        raise IncompatibleError(f"{source.path}: a PEFT adapter; merge it into its base model first")
    config = source.config
    if config is None:
        raise IncompatibleError(f"{source.path}: no config.json; GGUF needs the architecture's hyper-parameters")
    model_type = str(config.get("model_type"))
    arch = ARCHS.get(model_type)
    if arch is None:
        raise IncompatibleError(
            f"{source.path}: architecture {model_type!r} ({', '.join(config.get('architectures') or [])}) has no "
            f"GGUF mapping in weightsmith; supported: {', '.join(ARCHS)}"
        )
    _check_rope(source.path, config)
    return source, config, model_type, arch


def _gguf_names(ckpt: Any, path: Path, model_type: str) -> dict[str, str]:
    """Every tensor's GGUF name, in storage order; refused when one has none."""
    names, unknown = {}, []
    for name in ckpt:
        target = to_gguf_name(name, model_type)
        if target is None:
            unknown.append(name)
        else:
            names[name] = target
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise IncompatibleError(f"{path}: tensor {unknown[0]!r}{more} has no GGUF name for {model_type}")
    return names


def _plans(gg: Any, ckpt: Any, names: dict[str, str], kind: str) -> tuple[dict[str, Any], list[str], int]:
    """Per tensor (GGML type, shape, bytes): ``kind`` for 2-D weights, F32 for the rest, F16 for a weight whose
    rows are not a multiple of the type's block; also the F16 fallbacks and the block size."""
    qtype = gg.GGMLQuantizationType[kind.upper()]
    block, _ = gg.GGML_QUANT_SIZES[qtype]
    plans: dict[str, Any] = {}
    fallbacks = []
    for name in names:
        shape = tuple(ckpt.info(name).shape)
        t = qtype if len(shape) == 2 else gg.GGMLQuantizationType.F32
        if block > 1 and len(shape) == 2 and shape[-1] % block:
            t = gg.GGMLQuantizationType.F16
            fallbacks.append(name)
        b, size = gg.GGML_QUANT_SIZES[t]
        plans[name] = (t, shape, int(np.prod(shape)) // b * size)
    return plans, fallbacks, block


def _write_tensor(
    gg: Any, writer: Any, path: Path, name: str, target: str, tensor: torch.Tensor, plan: Any, arch: Any, config: dict
) -> dict[str, Any]:
    """Encode one tensor in its planned type and append it to the file, a chunk of rows at a time; returns its
    report row."""
    t, _, nbytes = plan
    encoded = _Encoded(gg, path, name, _to_llama_cpp(name, tensor, arch, config), t, nbytes)
    writer.write_tensor_data(encoded)
    row = {"name": name, "gguf": target, "type": t.name, "bytes": nbytes}
    rel = encoded.rel_error()
    if rel is not None:
        row["rel_error"] = rel
    return row


def _check_rope(path: Path, config: dict) -> None:
    """Refuse rope scalings this exporter does not write (llama.cpp needs extra tensors or keys for them)."""
    for params in _rope_params(config):
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in ("default", "linear"):
            raise IncompatibleError(
                f"{path}: rope scaling {kind!r} is not written to GGUF by weightsmith (default and linear are)"
            )


def _rope_params(config: dict) -> list[dict]:
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rp and all(isinstance(v, dict) for v in rp.values()):  # per layer type (Gemma 3)
        return list(rp.values())
    return [rp] if rp else []


def _rope_theta(config: dict) -> float | None:
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    rp = config.get("rope_parameters") or {}
    if "full_attention" in rp:  # Gemma 3: the global layers' base; llama.cpp fixes the local one at 10 000
        rp = rp["full_attention"]
    return float(rp["rope_theta"]) if rp.get("rope_theta") is not None else None


def _write_metadata(writer: Any, gg: Any, config: dict, arch: Any, source: TensorSource, kind: str) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_name(source.path.name)
    writer.add_type("model")
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    theta = _rope_theta(config)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if config.get("vocab_size"):
        writer.add_vocab_size(int(config["vocab_size"]))
    if arch.permute_qk:
        writer.add_rope_dimension_count(head_dim)
    if arch.head_dim_keys:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf == "phi3":
        factor = float((config.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0)
        writer.add_rope_dimension_count(int(head_dim * factor))
        writer.add_rope_scaling_orig_ctx_len(
            int(config.get("original_max_position_embeddings") or config.get("max_position_embeddings") or 2048)
        )
    if arch.gguf in ("gemma2", "gemma3") and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    if arch.gguf == "gemma2":
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
        writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
    for params in _rope_params(config):
        if (params.get("rope_type") or params.get("type")) == "linear":
            writer.add_rope_scaling_type(gg.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(params["factor"]))
            break
    writer.add_file_type(int(gg.LlamaFileType[_FILE_TYPES[kind]]))
    writer.add_quantization_version(gg.GGML_QUANT_VERSION)


def _write_special_ids(writer: Any, config: dict, vocab: Any) -> None:
    """config.json's bos/eos/pad ids where the tokenizer gave none (the model's own facts; loaders read them)."""
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id}
    for key, add in adders.items():
        value = config.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and (vocab is None or key not in vocab.special):
            add(int(value))


def _to_llama_cpp(name: str, w: torch.Tensor, arch: Any, config: dict) -> torch.Tensor:
    """A transformers tensor in llama.cpp's convention, in its stored dtype: q/k rows permuted (Llama), norms + 1
    (Gemma, in float32: the norms are small)."""
    heads = qk_heads(name, config) if arch.permute_qk else None
    if heads is not None:
        w = permute_qk(w, heads)
    if arch.norm_offset and is_norm(name):
        w = w.float() + arch.norm_offset
    return w.contiguous()


_CHUNK = 4 * 2**20  # elements per chunk (16 MB of float32): the float copies of a large embedding stay this size


class _Encoded:
    """One tensor's GGUF bytes, computed and written a chunk of rows at a time when gguf-py's writer asks for them
    (``write_tensor_data`` needs only ``nbytes`` and ``tofile``), so no float32 copy of a whole embedding is made.

    Each chunk is cast to float32, checked finite, then written as F32, F16 (checked for overflow) or quantised by
    ``gguf.quantize`` (blocks never straddle rows, so the bytes are those of one call on the whole tensor); block
    types also sum the squared error for the report's ‖W − Q(W)‖/‖W‖."""

    def __init__(self, gg: Any, path: Path, name: str, w: torch.Tensor, t: Any, nbytes: int):
        self.gg, self.path, self.name, self.w, self.t, self.nbytes = gg, path, name, w, t, nbytes
        self.err2, self.norm2 = 0.0, 0.0

    def tofile(self, fout: Any) -> None:
        rows = self.w.reshape(-1, self.w.shape[-1]) if self.w.dim() else self.w.reshape(1, 1)
        step = max(1, _CHUNK // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            self._encode(rows[start : start + step].float().numpy()).tofile(fout)

    def _encode(self, chunk: np.ndarray) -> np.ndarray:
        gg, t = self.gg, self.t
        if not np.isfinite(chunk).all():
            raise NumericalError(f"{self.path}: tensor {self.name!r} holds NaN or Inf; refusing to export it")
        if t == gg.GGMLQuantizationType.F32:
            return chunk
        if t == gg.GGMLQuantizationType.F16:
            half = chunk.astype(np.float16)
            if not np.isfinite(half).all():
                raise NumericalError(f"{self.path}: tensor {self.name!r} overflows float16; use `type` bf16 or f32")
            return half
        q = gg.quantize(chunk, t)
        if t != gg.GGMLQuantizationType.BF16:
            self.err2 += float(np.square(chunk - gg.dequantize(q, t), dtype=np.float64).sum())
            self.norm2 += float(np.square(chunk, dtype=np.float64).sum())
        return q

    def rel_error(self) -> float | None:
        """‖W − Q(W)‖ / ‖W‖ of a block type (None for F32, F16, BF16); known once the tensor is written."""
        if self.t in (self.gg.GGMLQuantizationType.F32, self.gg.GGMLQuantizationType.F16):
            return None
        if self.t == self.gg.GGMLQuantizationType.BF16:
            return None
        if self.norm2:
            return float(np.sqrt(self.err2 / self.norm2))
        return 0.0 if self.err2 == 0 else float("inf")
