"""``inspect`` (what a checkpoint holds) and ``diff`` (how two checkpoints differ), tensor by tensor."""

from __future__ import annotations

import os
import re
from collections import Counter

import torch

from weightsmith.checkpoint import Checkpoint, TensorSource
from weightsmith.conversion import as_checkpoint
from weightsmith.progress import progress
from weightsmith.report import Report, figures_requested
from weightsmith.units import format_size

_ARCH_KEYS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def inspect(path: TensorSource | str | os.PathLike, *, tensors: bool = False, stats: bool = False) -> Report:
    """Describe a checkpoint without loading it: format, files, architecture, parameters, dtypes, tied weights.

    ``tensors`` adds a row per tensor (name, shape, dtype, bytes); ``stats`` reads every tensor and adds min, max,
    mean, std, zero fraction and NaN/Inf counts.

    >>> print(ws.inspect("model_dir").to_text())  # doctest: +SKIP
    """
    ckpt = as_checkpoint(path)
    report = Report("inspect")
    infos = ckpt.infos()
    dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in infos)
    report.summary.update(
        path=str(ckpt.path),
        kind="adapter" if ckpt.is_adapter else "model",
        format=ckpt.format,
        files=[str(p.relative_to(ckpt.root)) for p in ckpt.weight_files],
        tensors=len(infos),
        parameters=sum(i.numel for i in infos),
        bytes=ckpt.nbytes,
        size=format_size(ckpt.nbytes),
        dtypes=dict(dtypes),
        tied_weights=ckpt.tied_weights or None,
    )
    if ckpt.config:
        report.details["architecture"] = {k: ckpt.config[k] for k in _ARCH_KEYS if k in ckpt.config}
    if ckpt.is_adapter:
        report.details["adapter"] = adapter_summary(ckpt)
    if ckpt.format == "gguf":
        report.details["gguf"] = gguf_facts(ckpt)
    quantization = _quantization_facts(ckpt)
    if quantization:
        report.details["quantization"] = quantization
    if ckpt.metadata.get("weightsmith"):
        report.details["provenance"] = {"weightsmith": ckpt.metadata["weightsmith"]}
    if tensors or stats:
        for info in progress(infos, desc="inspect"):
            row = {
                "name": info.name,
                "shape": list(info.shape),
                "dtype": str(info.dtype).removeprefix("torch."),
                "bytes": info.nbytes,
            }
            if stats:
                row.update(tensor_stats(ckpt[info.name]))
            report.tensors.append(row)
    if figures_requested():  # parameters and bytes by layer and module type, from the headers alone
        report.figures["tensors"] = [
            {
                "name": i.name,
                "shape": list(i.shape),
                "dtype": str(i.dtype).removeprefix("torch."),
                "params": i.numel,
                "bytes": i.nbytes,
            }
            for i in infos
        ]
    return report


def adapter_summary(ckpt: TensorSource) -> dict:
    """The facts of a PEFT adapter: type, rank, alpha, targets and variants (rsLoRA, DoRA, patterns…)."""
    cfg = ckpt.adapter_config or {}
    variants = [
        name
        for name, on in (
            ("rslora", cfg.get("use_rslora")),
            ("dora", cfg.get("use_dora")),
            ("lora_bias", cfg.get("lora_bias")),
            ("rank_pattern", cfg.get("rank_pattern")),
            ("alpha_pattern", cfg.get("alpha_pattern")),
        )
        if on
    ]
    part = re.compile(r"\.(lora_|hada_|lokr_|ia3_l$|oft_R\.|oft_embedding_R\.|vera_lambda_)")  # any PEFT type's parts
    modules = sorted({part.split(n.removeprefix("base_model.model."))[0] for n in ckpt if part.search(n)})
    return {
        "peft_type": cfg.get("peft_type"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "target_modules": cfg.get("target_modules"),
        "modules_to_save": cfg.get("modules_to_save"),
        "base_model": cfg.get("base_model_name_or_path"),
        "variants": variants,
        "adapted_modules": len(modules),
    }


def gguf_facts(ckpt: TensorSource) -> dict:
    """A GGUF file's own facts: its llama.cpp architecture, tensor types, tokenizer and selected metadata."""
    from weightsmith.checkpoint.gguf_file import GGUFFile
    from weightsmith.checkpoint.view import CheckpointView

    while isinstance(ckpt, CheckpointView):  # a view's file facts are its source's
        ckpt = ckpt.source
    wf = ckpt._files[0] if isinstance(ckpt, Checkpoint) else None
    if not isinstance(wf, GGUFFile):
        return {}
    meta = wf.gguf_metadata
    tok = wf.tokenizer_metadata
    return {
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "types": dict(Counter(wf.ggml_types.values())),
        "stored_bytes": wf.path.stat().st_size,
        "tokenizer": tok.get("tokenizer.ggml.model"),
        "vocabulary": len(tok.get("tokenizer.ggml.tokens") or []),
        "chat_template": "tokenizer.chat_template" in tok,
    }


def _quantization_facts(ckpt: TensorSource) -> dict | None:
    from weightsmith.compress.quantize.detect import describe

    return describe(ckpt)


def _float_view(ckpt: TensorSource):
    from weightsmith.compress.quantize.dequantize import float_view

    return float_view(ckpt)


def tensor_stats(t: torch.Tensor) -> dict:
    """min/max/mean/std over finite values, zero fraction and NaN/Inf counts (fp32/fp64 accumulation)."""
    x = t.double() if t.dtype == torch.float64 else t.float()
    finite = x[torch.isfinite(x)]
    n = x.numel()
    stats = {
        "zeros": round(float((x == 0).sum()) / n, 6) if n else 0.0,
        "nan": int(torch.isnan(x).sum()),
        "inf": int(torch.isinf(x).sum()),
    }
    if finite.numel():
        stats.update(
            min=float(finite.min()),
            max=float(finite.max()),
            mean=float(finite.mean()),
            std=float(finite.std()) if finite.numel() > 1 else 0.0,
        )
    return stats


def diff(a: TensorSource | str | os.PathLike, b: TensorSource | str | os.PathLike) -> Report:
    """Compare two checkpoints tensor by tensor: missing/extra names, shape/dtype mismatches, max |Δ|,
    relative Frobenius norm ‖A−B‖/‖A‖ and cosine, computed in fp32 (fp64 for fp64 tensors).

    >>> ws.diff("model_dir", "merged_dir").summary["identical"]  # doctest: +SKIP
    """
    ca, cb = _float_view(as_checkpoint(a)), _float_view(as_checkpoint(b))  # quantized sides dequantize per tensor
    report = Report("diff")
    only_a = [n for n in ca if n not in cb]
    only_b = [n for n in cb if n not in ca]
    mismatched, rows = [], []
    for name in progress([n for n in ca if n in cb], desc="diff"):
        ia, ib = ca.info(name), cb.info(name)
        if ia.shape != ib.shape:
            mismatched.append(f"{name}: shape {list(ia.shape)} vs {list(ib.shape)}")
            continue
        row = {"name": name, **compare_tensors(ca[name], cb[name])}
        if ia.dtype != ib.dtype:
            row["dtypes"] = f"{str(ia.dtype).removeprefix('torch.')}/{str(ib.dtype).removeprefix('torch.')}"
        rows.append(row)
    changed = [r for r in rows if r["max_abs"] != 0 or r.get("nan_mismatch")]
    worst = max(rows, key=lambda r: r["max_abs"], default=None)
    report.summary.update(
        a=str(ca.path),
        b=str(cb.path),
        compared=len(rows),
        identical=len(rows) - len(changed),
        differ=len(changed),
        missing_in_b=len(only_a),
        extra_in_b=len(only_b),
        shape_mismatches=len(mismatched),
        max_abs=worst["max_abs"] if worst else 0.0,
        worst=worst["name"] if worst and worst["max_abs"] else None,
    )
    listed = {"names_missing_in_b": only_a, "names_extra_in_b": only_b, "shape_mismatch_names": mismatched}
    report.details.update({k: v for k, v in listed.items() if v})
    report.tensors = sorted(rows, key=lambda r: -r["max_abs"])
    return report


def compare_tensors(x: torch.Tensor, y: torch.Tensor) -> dict:
    """max |x−y|, ‖x−y‖/‖x‖ and cosine(x, y) over the flattened tensors."""
    dt = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dt).reshape(-1), y.to(dt).reshape(-1)
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    row: dict = {}
    if (nan_x != nan_y).any():
        row["nan_mismatch"] = int((nan_x != nan_y).sum())
    both = ~(nan_x | nan_y)
    x, y = x[both], y[both]
    delta = x - y
    delta[torch.isinf(x) & (x == y)] = 0  # equal infinities are equal
    nx, ny = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    nd = float(torch.linalg.vector_norm(delta))
    row["max_abs"] = float(delta.abs().max()) if delta.numel() else 0.0
    row["rel_fro"] = nd / nx if nx else (0.0 if nd == 0 else float("inf"))
    row["cosine"] = float(torch.dot(x, y)) / (nx * ny) if nx and ny else (1.0 if nx == ny else 0.0)
    return row


def change_figures(before: torch.Tensor, after: torch.Tensor) -> dict:
    """How much a verb changed one tensor: ‖after − before‖/‖before‖ (``rel_change``) and cosine(before, after),
    in fp32 (fp64 for fp64 tensors). Four reductions, no NaN bookkeeping: the verbs that ask have checked their
    outputs are finite (a NaN in an input shows as a NaN figure)."""
    dt = torch.float64 if torch.float64 in (before.dtype, after.dtype) else torch.float32
    x, y = before.to(dt).reshape(-1), after.to(dt).reshape(-1)
    nx, ny = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    nd = float(torch.linalg.vector_norm(y - x))
    return {
        "rel_change": nd / nx if nx else (0.0 if nd == 0 else float("inf")),
        "cosine": float(torch.dot(x, y)) / (nx * ny) if nx and ny else (1.0 if nx == ny else 0.0),
    }
