"""Unstructured and N:M pruning as a lazy view: ``open_pruned`` checks everything and (for global scope) finds the
threshold; ``PrunedView[name]`` reads that tensor and applies its mask.

Masks (``masks.py``): magnitude per tensor (Han et al. 2015), one global magnitude threshold over all pruned
tensors, N:M (Mishra et al. 2021) on |W|, and Wanda (Sun et al. 2023) when calibration norms are given. Pruned
entries become dense zeros in the tensor's own dtype; the view casts to ``dtype`` afterwards. Only 2-D float
``.weight`` tensors not matching a skip pattern are pruned; every other tensor passes through (and is copied file to
file by the writer when its dtype does not change).

Only torch and safetensors are imported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from weightsmith import architecture
from weightsmith.checkpoint import CheckpointView, TensorSource, provenance_step, set_config_dtype
from weightsmith.compress.prune import masks
from weightsmith.compress.prune.methods import METHODS, NM, SCOPES, Magnitude, Wanda, make_method
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError
from weightsmith.progress import progress
from weightsmith.units import parse_dtype

# Left dense unless asked otherwise: pruning these hurts most and saves least (regexes, searched in the name).
DEFAULT_SKIP = (
    architecture.EMBEDDING_PARAMETER,
    r"norm|LayerNorm|(^|\.)ln_",
    r"lm_head|(^|\.)cls\.|classifier|(^|\.)score\.|pooler",
)
__all__ = ["DEFAULT_SKIP", "METHODS", "SCOPES", "PrunedView", "check_sparsity", "open_pruned", "parse_pattern"]


# -- checks -----------------------------------------------------------------------------------------------------


def skip_patterns(skip: Sequence[str], default_skip: bool) -> list[re.Pattern]:
    compiled = []
    for text in [*(DEFAULT_SKIP if default_skip else ()), *skip]:
        try:
            compiled.append(re.compile(text))
        except re.error as exc:
            raise ConfigError(f"`skip` {text!r}: not a valid regular expression ({exc})") from None
    return compiled


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → (2, 4); refuses anything but 0 < N < M."""
    nm = NM.parse(pattern)
    return nm.n, nm.m


def check_sparsity(sparsity: float | None) -> float:
    if sparsity is None:
        raise ConfigError("unstructured pruning needs `sparsity` (or `pattern` N:M)")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity {sparsity}: must be in [0, 1)")
    return float(sparsity)


def as_rows(ckpt: TensorSource, name: str, tensor: Tensor) -> Tensor:
    """The [out, in] view of a 2-D weight (Conv1D's [in, out] transposed: ``architecture``)."""
    return architecture.as_rows(ckpt.config, name, tensor)


def in_features(ckpt: TensorSource, name: str) -> int:
    return architecture.in_features(ckpt.config, name, tuple(ckpt.info(name).shape))


@dataclass
class PrunePlan:
    """What an unstructured prune does, settled before any tensor data is read."""

    method: str
    sparsity: float
    scope: str
    pattern: str | None
    nm: tuple[int, int] | None
    targets: list[str]  # pruned tensors, in storage order
    params: dict = field(default_factory=dict)  # the provenance parameters


def plan_unstructured(ckpt: TensorSource, config: Magnitude | Wanda | NM, skip: list[re.Pattern]) -> PrunePlan:
    """Check ``config`` against ``ckpt`` (names and shapes only) and pick the tensors to prune."""
    if isinstance(config, NM):
        method, sparsity, scope, pattern = config.criterion, 1 - config.n / config.m, "layer", config.pattern
        nm: tuple[int, int] | None = (config.n, config.m)
    else:
        method, sparsity, scope, pattern, nm = config.name, config.sparsity, "layer", None, None
        if isinstance(config, Magnitude):
            scope = config.scope
    targets = [
        n
        for n in ckpt
        if n.endswith(".weight")
        and len(ckpt.info(n).shape) == 2
        and ckpt.info(n).dtype.is_floating_point
        and not any(p.search(n) for p in skip)
    ]
    if not targets:
        raise ConfigError(f"{ckpt.path}: nothing to prune: every 2-D weight matches a skip pattern")
    if nm is not None:
        bad = [n for n in targets if in_features(ckpt, n) % nm[1]]
        if bad:
            raise ConfigError(
                f"{ckpt.path}: pattern {pattern} needs input widths divisible by {nm[1]}; "
                f"{len(bad)} tensor(s) are not, e.g. {bad[0]!r} with {in_features(ckpt, bad[0])} "
                f"inputs (`skip` them)"
            )
    params = {
        "method": method,
        "sparsity": sparsity,
        "scope": scope,
        "pattern": pattern,
        "skip": [p.pattern for p in skip],
    }
    return PrunePlan(method, sparsity, scope, pattern, nm, targets, params)


def mask_of(ckpt: TensorSource, name: str, weight: Tensor, plan: PrunePlan, norm: Tensor | None = None) -> Tensor:
    """The per-tensor keep-mask of ``weight`` (layer scope): magnitude, N:M, or Wanda given its input norms."""
    rows = as_rows(ckpt, name, weight)  # (out, in)
    if plan.method == "wanda":
        assert norm is not None  # Wanda plans come with the calibration norms
        scores = masks.wanda_scores(rows, norm)
        mask = masks.nm_mask(scores, *plan.nm) if plan.nm else masks.wanda_mask(rows, norm, plan.sparsity)
    else:
        mask = masks.nm_mask(rows.abs(), *plan.nm) if plan.nm else masks.magnitude_mask(rows, plan.sparsity)
    return as_rows(ckpt, name, mask)


def global_threshold(ckpt: TensorSource, targets: list[str], sparsity: float) -> tuple[int, int] | None:
    """Radix selection of the k-th smallest |w| over all targets, k = round(s·N), with two 65536-bin histograms.

    Pass 1 counts the high 16 bits of each |w| as float32 (its bfloat16 prefix); if the inputs hold more precision
    than that, pass 2 counts the low 16 bits within the selected bin. Returns the threshold's float32 bit pattern
    and how many entries equal to it must still go (ties, dropped in storage order), or None when k = 0.
    """
    k = round(sparsity * sum(ckpt.info(n).numel for n in targets))
    if k == 0:
        return None
    hist = _summed(masks.global_bin_histogram(ckpt[n], level=0) for n in progress(targets, desc="threshold"))
    high, below = masks.select_bin(hist, k)
    low = 0
    if any(ckpt.info(n).dtype != torch.bfloat16 for n in targets):
        hist = _summed(masks.global_bin_histogram(ckpt[n], level=1, prefix=high) for n in targets)
        low, below_low = masks.select_bin(hist, k - below)
        below += below_low
    return (high << 16) | low, k - below


def _summed(histograms: Iterable[Tensor]) -> Tensor:
    """The bin-wise sum of the histograms, one at a time (one [65536] int64 histogram held besides the next)."""
    total = torch.zeros(65536, dtype=torch.int64)
    for h in histograms:
        total += h
    return total


# -- the view ---------------------------------------------------------------------------------------------------


class PrunedView(CheckpointView):
    """``source`` with its pruning masks applied lazily: ``pruned[name]`` reads that tensor and zeroes its pruned
    entries (cast to ``dtype`` if given). A CheckpointView, so it streams into the next step.

    ``threshold`` (global scope) is ``global_threshold``'s result; ``norms`` (Wanda) maps each target's module name
    to its input norms [in]. Ties at a global threshold are dropped in storage order whatever order tensors are read
    in (reading a tensor out of order first counts the ties of the targets before it).
    """

    def __init__(
        self,
        source: TensorSource,
        plan: PrunePlan,
        *,
        threshold: tuple[int, int] | None = None,
        norms: dict[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(source, provenance_step("prune", plan.params, [source]))
        self.plan, self.dtype, self._norms = plan, dtype, norms or {}
        self._targets = set(plan.targets)
        if plan.method == "wanda":
            missing = [n for n in plan.targets if n.removesuffix(".weight") not in self._norms]
            if missing:
                raise ConfigError(
                    f"{source.path}: no calibration activations reached {missing[0]!r} (not a Linear layer?)"
                )
        self._threshold = threshold[0] if threshold else None
        self._ties = threshold[1] if threshold else 0  # entries equal to the threshold still to drop, overall
        self._ties_used: dict[str, int] = {}  # target → how many of those ties it dropped
        if dtype is not None and source.config is not None:
            self.config = dict(source.config)
            set_config_dtype(self.config, dtype)

    @property
    def targets(self) -> list[str]:
        """The pruned tensors, in storage order."""
        return self.plan.targets

    def pruned(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (``name``'s data as the source stores it) with its mask applied, in its own dtype; a new
        tensor for targets, ``tensor`` itself for everything else."""
        if name not in self._targets:
            return tensor
        if self._threshold is not None:
            mask, self._ties_used[name] = masks.threshold_mask(tensor, self._threshold, self._ties_before(name))
        else:  # layer scope (and a global k of 0, where no tensor loses an entry)
            mask = mask_of(self.source, name, tensor, self.plan, self._norms.get(name.removesuffix(".weight")))
        return tensor.masked_fill(~mask, 0)

    def _ties_before(self, name: str) -> int:
        """Ties the global count still needs when ``name`` is reached in storage order."""
        assert self._threshold is not None  # global scope only
        quota = self._ties
        for target in self.plan.targets:
            if target == name or quota == 0:
                break
            if target not in self._ties_used:
                tensor = self.source[target]
                self._ties_used[target] = masks.threshold_mask(tensor, self._threshold, quota)[1]
            quota -= self._ties_used[target]
        return quota

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._targets and name not in self.source:
            raise KeyError(name)
        value = self.pruned(name, self.source[name])
        target = self.info(name).dtype
        return value if value.dtype == target else value.to(target)

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def __repr__(self) -> str:
        return f"PrunedView({str(self.path)!r}, {self.plan.method} {self.plan.sparsity:g}, {len(self)} tensors)"

    def _changed(self, name: str) -> bool:
        return name in self._targets


def open_pruned(
    src: TensorSource | str | os.PathLike,
    method: Magnitude | NM | str | None = None,
    *,
    sparsity: float | None = None,
    scope: str | None = None,
    pattern: str | None = None,
    skip: Sequence[str] = (),
    default_skip: bool = True,
    dtype: str | torch.dtype | None = None,
) -> PrunedView:
    """``src`` pruned without data, as a lazy read-only tensor dict: ``Magnitude`` (``scope`` "layer": each tensor at
    exactly ``sparsity``; "global": one threshold over all pruned tensors, exact overall) or ``NM`` by magnitude;
    ``sparsity``/``scope``/``pattern`` are the keyword form of the same (``make_method``).

    Checked now; a global threshold is found now (one or two streamed passes over the pruned tensors, memory: two
    65536-bin histograms). Each tensor's mask is applied when it is read. Wanda needs the model for calibration:
    use ``prune(..., Wanda(...))``.

    >>> view = ws.compress.prune.open_pruned("llama", Magnitude(sparsity=0.5, scope="global"))  # doctest: +SKIP
    >>> ws.quantize(view, "llama-50-int8")                                                   # doctest: +SKIP
    """
    if method == "wanda" or isinstance(method, Wanda) or (isinstance(method, NM) and method.criterion == "wanda"):
        raise ConfigError("wanda measures activations through the model: it has no lazy view (use prune)")
    config = make_method(method, sparsity=sparsity, scope=scope, pattern=pattern)
    if not isinstance(config, (Magnitude, NM)):
        raise ConfigError(f"{config.name} pruning has no lazy view: magnitude and N:M pruning do (use prune)")
    ckpt = as_checkpoint(src)
    plan = plan_unstructured(ckpt, config, skip_patterns(skip, default_skip))
    threshold = global_threshold(ckpt, plan.targets, plan.sparsity) if plan.scope == "global" else None
    return PrunedView(ckpt, plan, threshold=threshold, dtype=parse_dtype(dtype))
