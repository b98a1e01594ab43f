"""Adapters into adapters, without a base model: ``combine`` (several LoRA adapters into one) and ``resize`` (one
adapter to a lower rank). Both write a PEFT LORA adapter that ``PeftModel.from_pretrained`` loads.

Every input is reduced to its exact low-rank terms per module, in the B·A picture (``[out, r]``·``[r, in·∏k]``;
embeddings ``lora_embedding_B [dim, r]``·``lora_embedding_A [r, num]``), with the adapter's scaling and weight folded
into A: Aᵢ' = wᵢ·sᵢ·Aᵢ, so rsLoRA, ``rank_pattern``/``alpha_pattern``, AdaLoRA's E and negative weights all stay
exact. Methods:

- ``cat``: ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [B₁ … Bₙ]·[A₁'; …; Aₙ'] exactly, rank Σ rᵢ, written with s = 1 (α = r per
  module). PEFT's ``add_weighted_adapter(combination_type="linear")`` instead sums A's and B's separately (√w on each),
  which creates cross terms Bᵢ·Aⱼ and makes an adapter at weight −1 equal to the same at +1.
- ``svd``: the exact sum, then its best rank-k approximation (Eckart–Young), k a ``rank`` or the smallest keeping
  ``energy`` of Σσ²; the energy kept is reported per module.
- ``ties`` / ``dare``: TIES (Yadav et al. 2023) or DARE (Yu et al. 2024) on the modules' ΔWᵢ = sᵢ·Bᵢ·Aᵢ with the
  weights wᵢ (``merge.methods``), then SVD as for ``svd``.

``resize`` is ``svd`` of one adapter, with a further choice: ``threshold`` keeps the singular values above it per
module (mergekit's extract-lora ``--sv-epsilon``). Only torch and safetensors are imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from weightsmith.checkpoint import TensorSource
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.merge.lora.extraction import unit_scale_config
from weightsmith.merge.lora.math import truncated_factors
from weightsmith.merge.lora.read import PREFIX, Adapter, check_finite, read_adapter
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.stream import Item, Stored, stream

METHODS = ("cat", "svd", "ties", "dare")


@dataclass
class _Term:
    """One input's exact low-rank term for one module: ΔW = B·A (weight and scaling already in A)."""

    a: Tensor  # [r, in, *k] (embedding: [r, num])
    b: Tensor  # [out, r, 1, …] (embedding: [dim, r])
    embedding: bool
    index: int  # which input


def _terms(adapters: Sequence[tuple[Adapter, float]]) -> dict[str, list[_Term]]:
    """{module: its terms}, in the order modules first appear."""
    out: dict[str, list[_Term]] = {}
    for i, (adapter, weight) in enumerate(adapters):
        ck = adapter.ckpt
        for mod in adapter.modules.values():
            assert mod.a is not None and mod.b is not None
            a = ck[mod.a].float() * (weight * mod.scaling)
            out.setdefault(mod.module, []).append(_Term(a, ck[mod.b].float(), mod.embedding, i))
    return out


def _delta(term: _Term) -> Tensor:
    """B·A as ``[out, in·∏k]``, in float64 so that the SVD after it is exact to float32's precision."""
    return term.b.reshape(term.b.shape[0], -1).double() @ term.a.reshape(term.a.shape[0], -1).double()


def _read(specs: Sequence[tuple[TensorSource | str | os.PathLike, float]], verb: str) -> list[tuple[Adapter, float]]:
    parsed = []
    for src, weight in specs:
        adapter = read_adapter(src)
        check_finite(adapter)
        why = None
        if adapter.updates:
            why = f"a {adapter.peft_type} adapter's update is not a low-rank product B·A"
        elif adapter.dora:
            why = "DoRA rescales rows by a norm of the base weight, which an adapter alone does not hold"
        elif any(m.bias for m in adapter.modules.values()):
            why = "lora_bias terms are not combined"
        else:
            own = [n for n in adapter.replacements if n not in adapter.modules]
            if own:
                why = f"it replaces whole tensors (modules_to_save or trained biases, e.g. {own[0]!r})"
        if why:
            raise IncompatibleError(f"{adapter.path}: cannot {verb}: {why}; fold it with 'lora merge' instead")
        if not adapter.modules:
            raise IncompatibleError(f"{adapter.path}: holds no LoRA modules to {verb}")
        parsed.append((adapter, weight))
    return parsed


def _check_choice(rank: int | None, energy: float | None, threshold: float | None, verb: str, *, need: bool) -> None:
    given = [x for x in (rank, energy, threshold) if x is not None]
    if len(given) > 1:
        raise ConfigError(f"{verb}: give at most one of rank, energy and threshold")
    if need and not given:
        raise ConfigError(f"{verb}: give a rank, an energy or a threshold for the SVD")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"{verb}: rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"{verb}: energy must be in (0, 1], got {energy!r}")
    if threshold is not None and not threshold >= 0:
        raise ConfigError(f"{verb}: threshold must be ≥ 0, got {threshold!r}")


def _compress(
    delta: Tensor, like: _Term, *, rank: int | None, energy: float | None, threshold: float | None
) -> tuple[Tensor, Tensor, float] | None:
    """(A, B, energy kept) of the best low-rank ΔW, shaped like ``like``'s factors; None when ΔW is zero."""
    if threshold is not None:
        s = torch.linalg.svdvals(delta)
        rank = max(1, int((s > threshold).sum()))
    try:
        a, b, kept = truncated_factors(delta, rank=rank, energy=energy)
    except ValueError:  # ΔW = 0
        return None
    k = a.shape[0]
    return a.float().reshape(k, *like.a.shape[1:]), b.float().reshape(b.shape[0], k, *like.b.shape[2:]), kept


def _write(
    out,
    adapters: Sequence[tuple[Adapter, float]],
    results: dict[str, tuple[Tensor, Tensor, bool]],
    operation: str,
    params: dict,
    force: bool,
    report: Report,
) -> dict:
    """The adapter directory: factors per module, the targeted modules' saved base copies, adapter_config.json.
    Returns the adapter config."""
    parts: dict[str, list[Item]] = {}
    for module, (a, b, embedding) in results.items():
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        parts[module] = [
            (f"{PREFIX}{module}.{names[0]}", a.contiguous()),
            (f"{PREFIX}{module}.{names[1]}", b.contiguous()),
        ]
    for adapter, _ in adapters:  # a targeted embedding's base_layer copy: the base's own, carried along
        for name, tensor in adapter.replacements.items():
            if name not in parts and name.rsplit(".", 1)[0] in results:
                module, param = name.rsplit(".", 1)
                parts[name] = [(f"{PREFIX}{module}.base_layer.{param}", Stored(adapter.ckpt, tensor))]
    config = _adapter_config(adapters, {m: a.shape[0] for m, (a, _, _) in results.items()})
    stream(
        adapters[0][0].ckpt,
        out,
        operation=operation,
        params=params,
        inputs=[a.ckpt for a, _ in adapters],
        names=parts,
        transform=parts.__getitem__,
        config=None,
        carry=[],
        files=lambda: {"adapter_config.json": json.dumps(config, indent=2) + "\n"},
        report=report,
        force=force,
        prefix="adapter_model",
        index_name=None,
        shard_size=2**62,
    )
    return config


def _adapter_config(adapters: Sequence[tuple[Adapter, float]], ranks: dict[str, int]) -> dict:
    """The combined adapter's config: r = the largest rank, the inputs' task type and base, s = 1."""
    first = adapters[0][0].config
    return unit_scale_config(
        list(ranks),
        ranks,
        max(ranks.values()),
        base_model=first.get("base_model_name_or_path"),
        task_type=first.get("task_type"),
        fan_in_fan_out=any(bool(a.config.get("fan_in_fan_out")) for a, _ in adapters),
    )


def combine(
    adapters: Sequence[tuple[TensorSource | str | os.PathLike, float] | TensorSource | str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "cat",
    rank: int | None = None,
    energy: float | None = None,
    density: float = 0.5,
    lam: float = 1.0,
    seed: int = 0,
    force: bool = False,
) -> Report:
    """Combine LoRA adapters [(path, weight), …] into one PEFT LoRA adapter (module docstring for the methods).

    ``cat`` is exact (rank Σ rᵢ per module); ``svd`` needs ``rank`` or ``energy``; ``ties``/``dare`` take ``density``
    (fraction of each ΔWᵢ kept), ``lam`` and ``seed`` (DARE), then SVD to ``rank``/``energy`` (default: no truncation
    beyond the combined rank Σ rᵢ). The report lists rank and, after an SVD, the energy kept per module.

    >>> ws.lora.combine([("math", 0.7), ("code", -0.4)], "both")                        # doctest: +SKIP
    >>> ws.lora.combine([("math", 1), ("code", 1)], "both16", method="svd", rank=16)     # doctest: +SKIP
    """
    from weightsmith.merge.lora.fold import _adapter_specs

    if method not in METHODS:
        raise ConfigError(f"combine: method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_choice(rank, energy, None, "combine", need=method == "svd")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise ConfigError(f"combine: density must be in (0, 1], got {density!r}")
    if method == "cat" and (rank is not None or energy is not None):
        raise ConfigError("combine: cat is exact; rank and energy apply to svd, ties and dare")
    parsed = _read(_adapter_specs(adapters), "combine")
    report = Report("lora combine", output=str(out))
    results: dict[str, tuple[Tensor, Tensor, bool]] = {}
    rows: list[dict[str, Any]] = []
    with report.timed("total"):
        for module, terms in progress(list(_terms(parsed).items()), desc="lora combine"):
            like = terms[0]
            if method == "cat":
                a = torch.cat([t.a for t in terms], 0)
                b = torch.cat([t.b for t in terms], 1)
                results[module] = (a, b, like.embedding)
                rows.append({"module": module, "rank": a.shape[0]})
                continue
            if method == "svd":
                delta = sum((_delta(t) for t in terms[1:]), _delta(terms[0]))
            else:
                delta = _merge_deltas(parsed, terms, method, density, lam, seed, module)
            full = sum(t.a.shape[0] for t in terms)
            kept = _compress(delta, like, rank=rank or (None if energy else full), energy=energy, threshold=None)
            if kept is None:
                rows.append({"module": module, "rank": 0, "energy_kept": 1.0})
                continue
            results[module] = (kept[0], kept[1], like.embedding)
            rows.append({"module": module, "rank": kept[0].shape[0], "energy_kept": round(kept[2], 6)})
    if not results:
        raise IncompatibleError(f"{out}: the combined adapters cancel out everywhere; nothing to write")
    params = {
        "adapters": [[str(a.path), w] for a, w in parsed],
        "method": method,
        "rank": rank,
        "energy": energy,
        **({"density": density, "lambda": lam, "seed": seed} if method in ("ties", "dare") else {}),
    }
    config = _write(out, parsed, results, "lora combine", params, force, report)
    report.summary.update(
        adapters=[f"{a.path}@{w:g}" for a, w in parsed],
        method=method,
        modules=len(results),
        r=config["r"],
        mean_energy_kept=_mean(rows),
    )
    report.tensors = rows
    return report


def _merge_deltas(
    parsed: Sequence[tuple[Adapter, float]],
    terms: list[_Term],
    method: str,
    density: float,
    lam: float,
    seed: int,
    module: str,
) -> Tensor:
    """TIES or DARE-TIES on the modules' unweighted ΔWᵢ (an absent module's ΔWᵢ is 0), weights wᵢ."""
    from weightsmith.merge import methods as M
    from weightsmith.merge.engine import tensor_seed

    deltas, weights = [], []
    for term in terms:
        w = parsed[term.index][1]
        delta = _delta(term).float()  # the merge methods work in float32, as the merge verb does
        deltas.append(delta / w if w != 0 else delta)  # the weight goes to the method
        weights.append(w)
    zero = torch.zeros_like(deltas[0])
    if method == "ties":
        return M.ties(zero, deltas, weights, [density] * len(deltas), lam=lam).double()
    seeds = [tensor_seed(seed, module, t.index) for t in terms]
    return M.dare_ties(zero, deltas, weights, [density] * len(deltas), seeds, lam=lam).double()


def _mean(rows: list[dict]) -> float | None:
    kept = [r["energy_kept"] for r in rows if "energy_kept" in r]
    return round(sum(kept) / len(kept), 6) if kept else None


def resize(
    adapter: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    threshold: float | None = None,
    force: bool = False,
) -> Report:
    """A LoRA adapter re-compressed by SVD of each module's ΔW = s·B·A: to ``rank`` (never above the module's own),
    to the smallest rank keeping ``energy`` of Σσ², or keeping the singular values above ``threshold``. The report
    gives rank before and after and the energy kept per module.

    >>> ws.lora.resize("adapter-r64", "adapter-r16", rank=16)        # doctest: +SKIP
    >>> ws.lora.resize("adapter-r64", "adapter-auto", threshold=1e-3)  # doctest: +SKIP
    """
    _check_choice(rank, energy, threshold, "resize", need=True)
    parsed = _read([(adapter, 1.0)], "resize")
    report = Report("lora resize", output=str(out))
    results: dict[str, tuple[Tensor, Tensor, bool]] = {}
    rows: list[dict[str, Any]] = []
    with report.timed("total"):
        for module, terms in progress(list(_terms(parsed).items()), desc="lora resize"):
            term = terms[0]
            own = term.a.shape[0]
            kept = _compress(
                _delta(term), term, rank=min(rank, own) if rank else None, energy=energy, threshold=threshold
            )
            if kept is None:
                continue
            if threshold is not None and kept[0].shape[0] > own:  # σ beyond the rank are rounding noise
                kept = _compress(_delta(term), term, rank=own, energy=None, threshold=None)
                assert kept is not None
            results[module] = (kept[0], kept[1], term.embedding)
            rows.append({"module": module, "rank_in": own, "rank": kept[0].shape[0], "energy_kept": round(kept[2], 6)})
    if not results:
        raise IncompatibleError(f"{parsed[0][0].path}: every module's ΔW is zero; nothing to write")
    params = {"adapter": str(parsed[0][0].path), "rank": rank, "energy": energy, "threshold": threshold}
    config = _write(out, parsed, results, "lora resize", params, force, report)
    report.summary.update(
        adapter=str(parsed[0][0].path),
        modules=len(results),
        r=config["r"],
        rank_sum_before=sum(int(r["rank_in"]) for r in rows),
        rank_sum_after=sum(int(r["rank"]) for r in rows),
        mean_energy_kept=_mean(rows),
    )
    report.tensors = rows
    return report
