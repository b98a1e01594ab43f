"""``prune``: unstructured (magnitude per tensor or global, Wanda), N:M semi-structured, and structured pruning.

Unstructured and N:M pruning write dense zeros (every tool loads them). Magnitude pruning streams tensor by tensor
and imports only torch and safetensors; Wanda and activation-scored structured pruning build the transformers
model once for calibration. Math lives in ``masks.py`` and ``structured.py``; calibration in ``wanda.py``.

>>> ws.prune("llama", "llama-50", method="magnitude", sparsity=0.5, scope="global")        # doctest: +SKIP
>>> ws.prune("minilm", "minilm-wanda", method="wanda", sparsity=0.5, calibration="c.txt")  # doctest: +SKIP
>>> ws.prune("llama", "llama-2of4", pattern="2:4")                                        # doctest: +SKIP
>>> ws.prune("llama", "llama-small", structured="ffn", ratio=0.25)                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, CheckpointWriter, check_destination, provenance_step
from weightsmith.compress.prune import masks
from weightsmith.compress.prune.unstructured import (
    DEFAULT_SKIP,
    METHODS,
    SCOPES,
    PrunedView,
    PrunePlan,
    check_sparsity,
    global_threshold,
    mask_of,
    open_pruned,
    parse_pattern,
    plan_unstructured,
    skip_patterns,
)
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.units import format_size, parse_dtype

__all__ = [
    "DEFAULT_SKIP",
    "METHODS",
    "SCOPES",
    "STRUCTURED",
    "PrunedView",
    "check_sparsity",
    "masks",
    "open_pruned",
    "parse_pattern",
    "prune",
]

STRUCTURED = ("ffn", "heads")


def prune(
    src: Checkpoint | str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "magnitude",
    sparsity: float | None = None,
    scope: str = "layer",
    pattern: str | None = None,
    calibration: str | os.PathLike | None = None,
    samples: int = 64,
    seq_len: int = 128,
    structured: str | None = None,
    ratio: float | None = None,
    keep_heads: int | None = None,
    skip: Sequence[str] = (),
    default_skip: bool = True,
    eval_data: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Prune ``src`` into ``out``; returns a Report with achieved sparsity, sizes and (with ``eval_data``) quality.

    Unstructured: ``method`` "magnitude" (|W|, ``scope`` "layer" = each tensor exactly at ``sparsity``, "global" =
    one threshold over all pruned tensors, exact overall) or "wanda" (|W|·‖X‖ per output row, ``calibration`` text
    file read through the checkpoint's tokenizer, ``samples`` lines of up to ``seq_len`` tokens). ``pattern`` "N:M"
    keeps N of every M consecutive input weights (with either method). ``structured`` "ffn" or "heads" removes
    ``ratio`` of the FFN neurons / query heads (or keeps ``keep_heads``) and rewrites config.json; scored by weights,
    or by activations when ``calibration`` is given. ``skip`` adds regexes of tensors left dense to DEFAULT_SKIP
    (``default_skip=False`` drops those). Only 2-D ``.weight`` tensors are ever pruned.
    """
    ckpt = as_checkpoint(src)
    target_dtype = parse_dtype(dtype)
    if samples < 1 or seq_len < 2:
        raise ConfigError(f"samples {samples} / seq_len {seq_len}: need samples ≥ 1 and seq_len ≥ 2")
    eval_texts = _eval_texts(ckpt, eval_data)
    check_destination(Path(out), force)
    options: dict[str, Any] = dict(dtype=target_dtype, shard_size=shard_size, force=force)
    if structured is not None:
        if sparsity is not None or pattern is not None:
            raise ConfigError(
                "structured pruning removes whole units: give `ratio`/`keep_heads`, not `sparsity`/`pattern`"
            )
        if method != "magnitude" or scope != "layer":
            raise ConfigError(
                "structured pruning is scored by weight norms, or by activations with `calibration`: "
                "`method`/`scope` do not apply"
            )
        from weightsmith.compress.prune.structured import prune_structured

        report = prune_structured(
            ckpt,
            out,
            kind=structured,
            ratio=ratio,
            keep_heads=keep_heads,
            calibration=calibration,
            samples=samples,
            seq_len=seq_len,
            **options,
        )
    else:
        report = _prune_unstructured(
            ckpt,
            out,
            method=method,
            sparsity=sparsity,
            scope=scope,
            pattern=pattern,
            calibration=calibration,
            samples=samples,
            seq_len=seq_len,
            skip=skip_patterns(skip, default_skip),
            **options,
        )
    if eval_texts is not None:
        with report.timed("eval"):
            report.details["quality"] = _quality(ckpt, out, eval_texts)
    return report


# -- checks -----------------------------------------------------------------------------------------------------


def _eval_texts(ckpt: Checkpoint, eval_data) -> list[str] | None:
    if eval_data is None:
        return None
    from weightsmith.evaluation import read_texts, require_tokenizer

    texts = read_texts(eval_data, what="evaluation file")
    require_tokenizer(ckpt.path)
    return texts


# -- unstructured: a PrunedView written tensor by tensor ---------------------------------------------------------


def _prune_unstructured(
    ckpt: Checkpoint,
    out,
    *,
    method: str,
    sparsity: float | None,
    scope: str,
    pattern: str | None,
    calibration,
    samples: int,
    seq_len: int,
    skip: list[re.Pattern],
    dtype,
    shard_size,
    force: bool,
) -> Report:
    plan = plan_unstructured(ckpt, method=method, sparsity=sparsity, scope=scope, pattern=pattern, skip=skip)
    if method == "wanda" and calibration is None:
        raise ConfigError("wanda needs `calibration`: a text file run through the model to measure activations")
    if method == "magnitude" and calibration is not None:
        raise ConfigError("magnitude pruning is data-free: `calibration` is only for wanda or structured pruning")
    report = Report("prune", output=str(out))
    norms: dict[str, Tensor] | None = None
    if method == "wanda":
        plan.params.update(calibration=str(calibration), samples=samples, seq_len=seq_len)
        with report.timed("calibrate"):
            norms = _wanda_norms(ckpt, calibration, samples, seq_len, plan)
    threshold = None
    if scope == "global":
        with report.timed("threshold"):
            threshold = global_threshold(ckpt, plan.targets, plan.sparsity)
    view = PrunedView(ckpt, plan, threshold=threshold, norms=norms, dtype=dtype)
    with report.timed("write"):
        _write(view, out, report, shard_size=shard_size, force=force)
    return report


def _write(view: PrunedView, out, report: Report, *, shard_size, force: bool) -> None:
    """Stream ``view`` into ``out``, counting nonzeros before and after each tensor's mask for the report."""
    ckpt, plan = view.source, view.plan
    rows, kept_total, pruned_total = [], 0, 0
    nonzero_before = nonzero_after = 0
    writer = CheckpointWriter(
        out,
        steps=[provenance_step("prune", plan.params, [ckpt])],
        config=ckpt.config,
        carry=ckpt.carry_files,
        dtype=view.dtype,
        shard_size=shard_size,
        force=force,
    )
    with writer:
        for name in progress(view, total=len(view), desc="prune"):
            original = ckpt[name]
            tensor = view.pruned(name, original)  # the source's dtype; the writer casts once
            nonzero_before += int(torch.count_nonzero(original)) if original.is_floating_point() else 0
            nonzero_after += int(torch.count_nonzero(tensor)) if tensor.is_floating_point() else 0
            if tensor is not original:
                zeros = tensor.numel() - int(torch.count_nonzero(tensor))
                rows.append(
                    {
                        "tensor": name,
                        "shape": "×".join(map(str, tensor.shape)),
                        "sparsity": round(zeros / tensor.numel(), 6),
                    }
                )
                pruned_total += zeros
                kept_total += tensor.numel()
            writer.write(name, tensor)
    if plan.nm is not None:
        report.notes.append(
            f"{plan.pattern}: every group of {plan.nm[1]} consecutive inputs keeps {plan.nm[0]} "
            f"weights (stored as dense zeros; semi-structured kernels are CUDA-only)"
        )
    total = sum(i.numel for i in ckpt.infos() if i.dtype.is_floating_point)  # parameters, not integer buffers
    report.summary.update(
        source=str(ckpt.path),
        method=plan.method,
        scope=plan.scope if plan.nm is None else f"pattern {plan.pattern}",
        sparsity_target=plan.sparsity,
        sparsity_pruned_tensors=round(pruned_total / kept_total, 6),
        sparsity_model=round(1 - nonzero_after / total, 6),
        pruned_tensors=len(plan.targets),
        params_before=total,
        params_after=total,
        nonzero_before=nonzero_before,
        nonzero_after=nonzero_after,
        bytes_before=format_size(ckpt.nbytes),
        bytes_after=format_size(writer.total_size),
    )
    report.tensors = rows
    report.notes.append("zeros are stored densely: the file size is unchanged")


def _wanda_norms(ckpt: Checkpoint, calibration, samples: int, seq_len: int, plan: PrunePlan) -> dict[str, Tensor]:
    """Input norms of every Linear, gathered block by block with each block pruned before the next one runs."""
    from weightsmith.compress.prune.wanda import input_norms
    from weightsmith.evaluation import encode, load_model, load_tokenizer, read_texts

    texts = read_texts(calibration, what="calibration file")
    tokenizer = load_tokenizer(ckpt.path)
    batches = encode(tokenizer, texts[:samples], seq_len)
    model = load_model(ckpt.path)
    targets = set(plan.targets)

    def prune_block(modules, block_norms) -> None:
        for module_name, module in modules.items():
            name = f"{module_name}.weight"
            if name in targets:
                norm = block_norms.get(module_name)
                if norm is None:
                    raise ConfigError(f"{ckpt.path}: no calibration activations reached {name!r} (not a Linear layer?)")
                weight = module.weight.data  # our own model copy: pruned in place so later blocks see it
                weight.mul_(mask_of(ckpt, name, weight, plan, norm))

    return input_norms(model, batches, prune_block)


def _quality(ckpt: Checkpoint, out, texts: list[str]) -> dict:
    """Perplexity before/after for a causal LM; embedding cosine to the original for an encoder."""
    from weightsmith import evaluation as evaluate

    if evaluate.is_causal_lm(ckpt.config):
        tokenizer = evaluate.load_tokenizer(ckpt.path)
        return {
            "metric": "perplexity",
            "texts": len(texts),
            "before": evaluate.perplexity(ckpt.path, texts, tokenizer=tokenizer),
            "after": evaluate.perplexity(out, texts, tokenizer=tokenizer),
        }
    return {
        "metric": "embedding cosine to the original",
        "texts": len(texts),
        "before": 1.0,
        "after": evaluate.embedding_cosine(out, ckpt.path, texts),
    }
