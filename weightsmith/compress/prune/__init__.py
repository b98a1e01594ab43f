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

import torch
from torch import Tensor

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, CheckpointWriter, check_destination, provenance_step
from weightsmith.compress.prune import masks
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.units import format_size, parse_dtype

# Left dense unless asked otherwise: pruning these hurts most and saves least (regexes, searched in the name).
DEFAULT_SKIP = (r"embed|wte|wpe", r"norm|LayerNorm|(^|\.)ln_", r"lm_head|(^|\.)cls\.|classifier|(^|\.)score\.|pooler")
METHODS = ("magnitude", "wanda")
SCOPES = ("layer", "global")
STRUCTURED = ("ffn", "heads")


def prune(src: Checkpoint | str | os.PathLike, out: str | os.PathLike, *, method: str = "magnitude",
          sparsity: float | None = None, scope: str = "layer", pattern: str | None = None,
          calibration: str | os.PathLike | None = None, samples: int = 64, seq_len: int = 128,
          structured: str | None = None, ratio: float | None = None, keep_heads: int | None = None,
          skip: Sequence[str] = (), default_skip: bool = True, eval_data: str | os.PathLike | None = None,
          dtype: str | torch.dtype | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
          force: bool = False) -> Report:
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
    check_destination(out, force)
    options = dict(dtype=target_dtype, shard_size=shard_size, force=force)
    if structured is not None:
        if sparsity is not None or pattern is not None:
            raise ConfigError("structured pruning removes whole units: give --ratio/--keep-heads, not "
                              "--sparsity/--pattern")
        if method != "magnitude" or scope != "layer":
            raise ConfigError("structured pruning is scored by weight norms, or by activations with --calibration: "
                              "--method/--scope do not apply")
        from weightsmith.compress.prune.structured import prune_structured

        report = prune_structured(ckpt, out, kind=structured, ratio=ratio, keep_heads=keep_heads,
                                  calibration=calibration, samples=samples, seq_len=seq_len, **options)
    else:
        report = _prune_unstructured(ckpt, out, method=method, sparsity=sparsity, scope=scope, pattern=pattern,
                                     calibration=calibration, samples=samples, seq_len=seq_len,
                                     skip=_skip_patterns(skip, default_skip), **options)
    if eval_texts is not None:
        with report.timed("eval"):
            report.details["quality"] = _quality(ckpt, out, eval_texts)
    return report


# -- checks -----------------------------------------------------------------------------------------------------


def _eval_texts(ckpt: Checkpoint, eval_data) -> list[str] | None:
    if eval_data is None:
        return None
    from weightsmith.evaluate import read_texts, require_tokenizer

    texts = read_texts(eval_data, what="evaluation file")
    require_tokenizer(ckpt.path)
    return texts


def _skip_patterns(skip: Sequence[str], default_skip: bool) -> list[re.Pattern]:
    compiled = []
    for text in [*(DEFAULT_SKIP if default_skip else ()), *skip]:
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise ConfigError(f"--skip {text!r}: not a valid regular expression ({exc})") from None
    return compiled


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → (2, 4); refuses anything but 0 < N < M."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"pattern {pattern!r}: expected N:M with 0 < N < M, e.g. 2:4")
    return int(m.group(1)), int(m.group(2))


def check_sparsity(sparsity: float | None) -> float:
    if sparsity is None:
        raise ConfigError("unstructured pruning needs --sparsity (or --pattern N:M)")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity {sparsity}: must be in [0, 1)")
    return float(sparsity)


def _is_conv1d(ckpt: Checkpoint, name: str) -> bool:
    """GPT-2's Conv1D stores [in, out]; every other 2-D weight here is [out, in]."""
    gpt2 = (ckpt.config or {}).get("model_type") == "gpt2"
    return gpt2 and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name) is not None


def _as_rows(ckpt: Checkpoint, name: str, tensor: Tensor) -> Tensor:
    """The [out, in] view of a 2-D weight."""
    return tensor.t() if _is_conv1d(ckpt, name) else tensor


# -- unstructured -----------------------------------------------------------------------------------------------


def _prune_unstructured(ckpt: Checkpoint, out, *, method: str, sparsity: float | None, scope: str,
                        pattern: str | None, calibration, samples: int, seq_len: int, skip: list[re.Pattern],
                        dtype, shard_size, force: bool) -> Report:
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
    nm = parse_pattern(pattern) if pattern is not None else None
    if nm is not None:
        if sparsity is not None and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"sparsity {sparsity} contradicts pattern {pattern} (which means {1 - nm[0] / nm[1]})")
        if scope != "layer":
            raise ConfigError(f"pattern {pattern} is applied group by group: it has no global scope")
        sparsity = 1 - nm[0] / nm[1]
    sparsity = check_sparsity(sparsity)
    if method == "wanda" and scope == "global":
        raise ConfigError("wanda compares scores within each output row: it has no global scope")
    if method == "wanda" and calibration is None:
        raise ConfigError("wanda needs --calibration FILE.txt (text run through the model to measure activations)")
    if method == "magnitude" and calibration is not None:
        raise ConfigError("magnitude pruning is data-free: --calibration is only for wanda or structured pruning")

    targets = [n for n in ckpt if n.endswith(".weight") and len(ckpt.info(n).shape) == 2
               and ckpt.info(n).dtype.is_floating_point and not any(p.search(n) for p in skip)]
    if not targets:
        raise ConfigError(f"{ckpt.path}: nothing to prune: every 2-D weight matches a skip pattern")
    if nm is not None:
        bad = [n for n in targets if _in_features(ckpt, n) % nm[1]]
        if bad:
            raise ConfigError(f"{ckpt.path}: pattern {pattern} needs input widths divisible by {nm[1]}; "
                              f"{len(bad)} tensor(s) are not, e.g. {bad[0]!r} with {_in_features(ckpt, bad[0])} "
                              f"inputs (--skip them)")
    params = {"method": method, "sparsity": sparsity, "scope": scope, "pattern": pattern,
              "skip": [p.pattern for p in skip]}
    report = Report("prune", output=str(out))
    target_set = set(targets)

    def mask_of(name: str, weight: Tensor, norm: Tensor | None) -> Tensor:
        rows = _as_rows(ckpt, name, weight)  # (out, in)
        if method == "wanda":
            if norm is None:
                raise ConfigError(f"{ckpt.path}: no calibration activations reached {name!r} (not a Linear layer?)")
            scores = masks.wanda_scores(rows, norm)
            mask = masks.nm_mask(scores, *nm) if nm else masks.wanda_mask(rows, norm, sparsity)
        else:
            mask = masks.nm_mask(rows.abs(), *nm) if nm else masks.magnitude_mask(rows, sparsity)
        return _as_rows(ckpt, name, mask)

    norms: dict[str, Tensor] = {}
    if method == "wanda":
        params.update(calibration=str(calibration), samples=samples, seq_len=seq_len)
        with report.timed("calibrate"):
            norms = _wanda_norms(ckpt, calibration, samples, seq_len, target_set, mask_of)
    threshold = None
    if scope == "global":
        with report.timed("threshold"):
            threshold = _global_threshold(ckpt, targets, sparsity)
    quota = threshold[1] if threshold else 0

    rows, kept_total, pruned_total = [], 0, 0
    nonzero_before = nonzero_after = 0
    with report.timed("write"):
        writer = CheckpointWriter(out, steps=[provenance_step("prune", params, [ckpt])], config=ckpt.config,
                                  carry=ckpt.carry_files, dtype=dtype, shard_size=shard_size, force=force)
        with writer:
            for name in progress(ckpt, total=len(ckpt), desc="prune"):
                tensor = ckpt[name]
                nz_in = int(torch.count_nonzero(tensor)) if tensor.is_floating_point() else 0
                if name in target_set:
                    if threshold is not None:
                        mask, used = masks.threshold_mask(tensor, threshold[0], quota)
                        quota -= used
                    else:
                        mask = mask_of(name, tensor, norms.get(name.removesuffix(".weight")))
                    tensor = tensor.masked_fill(~mask, 0)
                    zeros = tensor.numel() - int(torch.count_nonzero(tensor))
                    rows.append({"tensor": name, "shape": "×".join(map(str, tensor.shape)),
                                 "sparsity": round(zeros / tensor.numel(), 6)})
                    pruned_total += zeros
                    kept_total += tensor.numel()
                nonzero_before += nz_in
                nonzero_after += int(torch.count_nonzero(tensor)) if tensor.is_floating_point() else 0
                writer.write(name, tensor)
    if nm is not None:
        report.notes.append(f"{pattern}: every group of {nm[1]} consecutive inputs keeps {nm[0]} weights "
                            f"(stored as dense zeros; semi-structured kernels are CUDA-only)")
    total = sum(i.numel for i in ckpt.infos() if i.dtype.is_floating_point)  # parameters, not integer buffers
    report.summary.update(source=str(ckpt.path), method=method, scope=scope if nm is None else f"pattern {pattern}",
                          sparsity_target=sparsity, sparsity_pruned_tensors=round(pruned_total / kept_total, 6),
                          sparsity_model=round(1 - nonzero_after / total, 6), pruned_tensors=len(targets),
                          params_before=total, params_after=total, nonzero_before=nonzero_before,
                          nonzero_after=nonzero_after, bytes_before=format_size(ckpt.nbytes),
                          bytes_after=format_size(writer.total_size))
    report.tensors = rows
    report.notes.append("zeros are stored densely: the file size is unchanged")
    return report


def _in_features(ckpt: Checkpoint, name: str) -> int:
    shape = ckpt.info(name).shape
    return shape[0] if _is_conv1d(ckpt, name) else shape[1]


def _wanda_norms(ckpt: Checkpoint, calibration, samples: int, seq_len: int, targets: set[str], mask_of
                 ) -> dict[str, Tensor]:
    """Input norms of every Linear, gathered block by block with each block pruned before the next one runs."""
    from weightsmith.compress.prune.wanda import input_norms
    from weightsmith.evaluate import encode, load_model, load_tokenizer, read_texts

    texts = read_texts(calibration, what="calibration file")
    tokenizer = load_tokenizer(ckpt.path)
    batches = encode(tokenizer, texts[:samples], seq_len)
    model = load_model(ckpt.path)

    def prune_block(modules, block_norms) -> None:
        for module_name, module in modules.items():
            name = f"{module_name}.weight"
            if name in targets:
                weight = module.weight.data  # our own model copy: pruned in place so later blocks see it
                weight.mul_(mask_of(name, weight, block_norms.get(module_name)))

    return input_norms(model, batches, prune_block)


def _global_threshold(ckpt: Checkpoint, targets: list[str], sparsity: float) -> tuple[int, int] | None:
    """Radix selection of the k-th smallest |w| over all targets, k = round(s·N), with two 65536-bin histograms.

    Pass 1 counts the high 16 bits of each |w| as float32 (its bfloat16 prefix); if the inputs hold more precision
    than that, pass 2 counts the low 16 bits within the selected bin. Returns the threshold's float32 bit pattern
    and how many entries equal to it must still go (ties, dropped in storage order), or None when k = 0.
    """
    k = round(sparsity * sum(ckpt.info(n).numel for n in targets))
    if k == 0:
        return None
    hist = sum(masks.global_bin_histogram(ckpt[n], level=0) for n in progress(targets, desc="threshold"))
    high, below = masks.select_bin(hist, k)
    low = 0
    if any(ckpt.info(n).dtype != torch.bfloat16 for n in targets):
        hist = sum(masks.global_bin_histogram(ckpt[n], level=1, prefix=high) for n in targets)
        low, below_low = masks.select_bin(hist, k - below)
        below += below_low
    return (high << 16) | low, k - below


def _quality(ckpt: Checkpoint, out, texts: list[str]) -> dict:
    """Perplexity before/after for a causal LM; embedding cosine to the original for an encoder."""
    from weightsmith import evaluate

    if evaluate.is_causal_lm(ckpt.config):
        tokenizer = evaluate.load_tokenizer(ckpt.path)
        return {"metric": "perplexity", "texts": len(texts),
                "before": evaluate.perplexity(ckpt.path, texts, tokenizer=tokenizer),
                "after": evaluate.perplexity(out, texts, tokenizer=tokenizer)}
    return {"metric": "embedding cosine to the original", "texts": len(texts), "before": 1.0,
            "after": evaluate.embedding_cosine(out, ckpt.path, texts)}
