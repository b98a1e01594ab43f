"""The ``prune`` verb: build the method's config, check the destination, run the method's code (``RUNNERS``, by the
config's type) and, with ``eval_data``, measure quality before and after. The unstructured runner lives here: a
``PrunedView`` written tensor by tensor (and, for Wanda, calibrated through the model first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, TensorSource, check_destination
from weightsmith.compress.prune.methods import NM, Magnitude, Method, StructuredFFN, StructuredHeads, Wanda, make_method
from weightsmith.compress.prune.unstructured import (
    PrunedView,
    PrunePlan,
    global_threshold,
    mask_of,
    plan_unstructured,
    skip_patterns,
)
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError
from weightsmith.report import Report
from weightsmith.stream import Item, Written, stream
from weightsmith.units import format_size, parse_dtype


def prune(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    method: Method | str | None = None,
    *,
    skip: Sequence[str] = (),
    default_skip: bool = True,
    eval_data: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    **keywords: Any,
) -> Report:
    """Prune ``src`` into ``out`` as ``method`` says; returns a Report with achieved sparsity, sizes and (with
    ``eval_data``) quality.

    ``method``: a config (``Magnitude``, ``Wanda``, ``NM``, ``StructuredFFN``, ``StructuredHeads``), or the keyword
    form, whose ``keywords`` ``make_method`` turns into one: ``sparsity``, ``scope``, ``method`` "magnitude"/"wanda",
    ``pattern`` "N:M", ``structured`` "ffn"/"heads", ``ratio``, ``keep_heads``, ``calibration``, ``samples``,
    ``seq_len``. ``skip`` adds regexes of tensors left dense to DEFAULT_SKIP (``default_skip=False`` drops those);
    only 2-D ``.weight`` tensors are ever pruned. ``eval_data``: a text file; perplexity (causal LM) or embedding
    cosine to the original (encoder) before and after.

    >>> ws.prune("llama", "llama-50", Magnitude(sparsity=0.5))  # doctest: +SKIP
    """
    config = make_method(method, **keywords)
    ckpt = as_checkpoint(src)
    target_dtype = parse_dtype(dtype)
    eval_texts = _eval_texts(ckpt, eval_data)
    check_destination(Path(out), force)
    run = RUNNERS[type(config)]
    options = dict(skip=list(skip), default_skip=default_skip, dtype=target_dtype, shard_size=shard_size, force=force)
    report = run(ckpt, out, config, **options)
    if eval_texts is not None:
        with report.timed("eval"):
            report.details["quality"] = _quality(ckpt, out, eval_texts)
    return report


# -- checks -----------------------------------------------------------------------------------------------------


def _eval_texts(ckpt: TensorSource, eval_data) -> list[str] | None:
    if eval_data is None:
        return None
    from weightsmith.evaluation import read_texts, require_tokenizer

    texts = read_texts(eval_data, what="evaluation file")
    require_tokenizer(ckpt.path)
    return texts


# -- unstructured: a PrunedView written tensor by tensor ---------------------------------------------------------


def _prune_unstructured(
    ckpt: TensorSource,
    out,
    config: Magnitude | Wanda | NM,
    *,
    skip: list[str],
    default_skip: bool,
    dtype,
    shard_size,
    force: bool,
) -> Report:
    plan = plan_unstructured(ckpt, config, skip_patterns(skip, default_skip))
    report = Report("prune", output=str(out))
    norms: dict[str, Tensor] | None = None
    if plan.method == "wanda":
        assert isinstance(config, (Wanda, NM))  # only these score by activations
        plan.params.update(calibration=config.calibration, samples=config.samples, seq_len=config.seq_len)
        with report.timed("calibrate"):
            norms = _wanda_norms(ckpt, config.calibration, config.samples, config.seq_len, plan)
    threshold = None
    if plan.scope == "global":
        with report.timed("threshold"):
            threshold = global_threshold(ckpt, plan.targets, plan.sparsity)
    view = PrunedView(ckpt, plan, threshold=threshold, norms=norms, dtype=dtype)
    _write(view, out, report, shard_size=shard_size, force=force)
    return report


def _prune_structured(
    ckpt: TensorSource, out, config: StructuredFFN | StructuredHeads, *, skip: list[str], default_skip: bool, **options
) -> Report:
    if skip or not default_skip:
        raise ConfigError("`skip` chooses the tensors of unstructured pruning: structured pruning removes whole units")
    from weightsmith.compress.prune.structured import prune_structured

    return prune_structured(ckpt, out, config, **options)


# The code that runs each method, by its config's type: the verb itself knows no method.
RUNNERS: dict[type, Callable[..., Report]] = {
    Magnitude: _prune_unstructured,
    Wanda: _prune_unstructured,
    NM: _prune_unstructured,
    StructuredFFN: _prune_structured,
    StructuredHeads: _prune_structured,
}


def _write(view: PrunedView, out, report: Report, *, shard_size, force: bool) -> None:
    """Stream ``view`` into ``out``, counting nonzeros before and after each tensor's mask for the report."""
    ckpt, plan = view.source, view.plan
    rows: list[dict[str, Any]] = []
    counts = dict.fromkeys(("kept", "pruned", "nonzero_before", "nonzero_after", "bytes_written"), 0)

    def pruned(name: str) -> list[Item]:
        original = ckpt[name]
        tensor = view.pruned(name, original)  # the source's dtype; the writer casts once
        counts["nonzero_before"] += int(torch.count_nonzero(original)) if original.is_floating_point() else 0
        counts["nonzero_after"] += int(torch.count_nonzero(tensor)) if tensor.is_floating_point() else 0
        if tensor is not original:
            zeros = tensor.numel() - int(torch.count_nonzero(tensor))
            rows.append(
                {
                    "tensor": name,
                    "shape": "×".join(map(str, tensor.shape)),
                    "sparsity": round(zeros / tensor.numel(), 6),
                }
            )
            counts["pruned"] += zeros
            counts["kept"] += tensor.numel()
        return [(name, tensor)]

    def remember(written: Written) -> dict[str, Any]:
        counts["bytes_written"] = written.bytes
        return {}  # the summary is built below, from the whole tally

    stream(
        ckpt,
        out,
        operation="prune",
        params=plan.params,
        names=list(view),
        transform=pruned,
        report=report,
        desc="prune",
        dtype=view.dtype,
        shard_size=shard_size,
        force=force,
        timing="write",
        summary=remember,
    )
    kept_total, pruned_total = counts["kept"], counts["pruned"]
    nonzero_before, nonzero_after = counts["nonzero_before"], counts["nonzero_after"]
    bytes_written = counts["bytes_written"]
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
        bytes_after=format_size(bytes_written),
    )
    report.tensors = rows
    report.notes.append("zeros are stored densely: the file size is unchanged")


def _wanda_norms(ckpt: TensorSource, calibration, samples: int, seq_len: int, plan: PrunePlan) -> dict[str, Tensor]:
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


def _quality(ckpt: TensorSource, out, texts: list[str]) -> dict:
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
