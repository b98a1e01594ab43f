"""The merge-method table: one row per method, and the only place that names one.

A row says where the method's pure function lives (imported on first use, so this module stays torch-free), how
the function takes its tensors, whether the method needs a base, how many models it takes, its parameters with
their defaults (written once, here) and the checks its parameter values must pass. The config reader validates
against the rows, the engine calls ``row.apply`` without knowing which method it runs, and the CLI builds its
choices and flags from them.

    >>> METHODS["ties"].defaults()["density"]
    1.0
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from weightsmith.errors import ConfigError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a parameter without a default: the config must give it

# Defaults shared by several rows (each written once, here).
GAMMA = 0.01  # breadcrumbs: mergekit's default drops the top 1% of |δ| as outliers
EPSILON = 0.15  # DELLA: mergekit's default spread of keep probabilities around the density
RESCALE_MODE = "1/p"  # DARE/DELLA survivors: the papers' unbiased 1/p (mergekit's L1 matching is "l1")
RESCALE_MODES = ("1/p", "l1")
CONSENSUS = ("sum", "count")


@dataclass(frozen=True, kw_only=True)
class Param:
    """One parameter of a method: its name in mergekit YAML, default, type and scope."""

    name: str
    default: Any = REQUIRED
    kind: str = "number"  # "number" | "int" | "bool" | "choice"
    choices: tuple[str, ...] = ()
    per_model: bool = False  # one value per model per tensor (else one per tensor, top-level only)
    arg: str | None = None  # the function's keyword (a list for per-model values); None: accepted, no effect
    help: str = ""


@dataclass(frozen=True, kw_only=True)
class FamilyRow:
    """One method of the task-vector family: how δᵢ are thinned, how signs are elected, what is normalised
    (mergekit's generalized task arithmetic). ``normalize`` and ``rescale`` are the row's defaults."""

    sparsifier: str | None  # None | "magnitude" | "random" | "outliers" | "rank_random"
    consensus: str | None  # None | "sum" | "count": elect a sign per entry and keep only agreeing δᵢ
    normalize: bool  # default: divide by the sum of (agreeing) weights
    rescale: bool  # default: restore the scale of dropped entries (random sparsifiers)


# How a row's function takes its tensors: (function, base, tensors, row) -> the call's positional part.
_SHAPES: dict[str, Callable[[Callable, Any, list, Method], tuple]] = {
    "models": lambda f, base, ts, row: (ts,),  # f(tensors, …): the base, if any, is one of the models
    "base_models": lambda f, base, ts, row: (base, ts),  # f(base, tensors, …); base may be None when optional
    "base_other": lambda f, base, ts, row: (base, ts[0]),  # f(base, other, …)
    "two": lambda f, base, ts, row: (ts[0], ts[1]),  # f(a, b, …, base=base)
    "one": lambda f, base, ts, row: (ts[0],),  # f(tensor, …)
    "family": lambda f, base, ts, row: (row.family, base, ts),  # f(family_row, base, tensors, …)
}

Check = Callable[[str, Sequence[str], Mapping[str, Any], Sequence[Mapping[str, Any]]], None]


@dataclass(frozen=True, kw_only=True)
class Method:
    """A row of the table. ``base``: "required", "optional" (θ_b when given) or "input" (an ordinary input when
    given); ``min_models``/``max_models`` count the models besides the base, except for base="input" (with it)."""

    name: str
    function: str  # "module:attribute", imported on first call
    shape: str  # a key of _SHAPES
    base: str
    min_models: int
    max_models: int | None
    params: tuple[Param, ...] = ()
    native: bool = False  # takes the stored dtype and ``out_dtype`` and rounds once itself (else float32 in/out)
    seeded: bool = False  # takes ``seeds`` (one random stream per model)
    stats: bool = False  # returns (tensor, stats)
    family: FamilyRow | None = None
    checks: tuple[Check, ...] = ()
    paper: str = ""
    base_keyword: bool = False  # also passes ``base=`` (shape "two")
    # True when, for these resolved values, the method returns its single input unchanged: the engine then copies
    # the stored tensor (no float32 round trip)
    identity: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], bool] | None = None

    @cached_property
    def shared(self) -> dict[str, Any]:
        """Top-level-only parameters and their defaults."""
        return {p.name: p.default for p in self.params if not p.per_model}

    @cached_property
    def per_model(self) -> dict[str, Any]:
        """Per-model parameters and their defaults."""
        return {p.name: p.default for p in self.params if p.per_model}

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def resolve(self) -> Callable:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)

    def check(self, where: str, labels: Sequence[str], shared: Mapping[str, Any], per_model: Sequence[Mapping]) -> None:
        """Raise ConfigError when the resolved values for one tensor cannot work."""
        for check in self.checks:
            check(where, labels, shared, per_model)

    def apply(
        self,
        base: Any,
        tensors: list,
        shared: Mapping[str, Any],
        per_model: Sequence[Mapping[str, Any]],
        *,
        seeds: Sequence[int],
        out_dtype: Any,
    ) -> tuple[Any, Any]:
        """Call the method on one tensor's inputs with resolved parameter values: returns (merged, stats)."""
        fn = self.resolve()
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p.arg is not None:
                kwargs[p.arg] = [m[p.name] for m in per_model] if p.per_model else shared[p.name]
        if self.seeded:
            kwargs["seeds"] = seeds
        if self.native:
            kwargs["out_dtype"] = out_dtype
        if self.base_keyword:
            kwargs["base"] = base
        if self.shape == "one":  # a single model: its per-model values as scalars
            kwargs = {k: v[0] if isinstance(v, list) else v for k, v in kwargs.items()}
        result = fn(*_SHAPES[self.shape](fn, base, tensors, self), **kwargs)
        return result if self.stats else (result, None)


# ---------------------------------------------------------------------------------------------------------------
# Checks (torch-free: they see resolved parameter values, never tensors)


def _check_density(where: str, labels: Sequence[str], shared: Mapping, per_model: Sequence[Mapping]) -> None:
    for label, p in zip(labels, per_model):
        d = p.get("density")
        if d is not None and not 0 <= d <= 1:
            raise ConfigError(f"{where}: density {d} of model {label} is outside [0, 1]")


def _check_epsilon(where: str, labels: Sequence[str], shared: Mapping, per_model: Sequence[Mapping]) -> None:
    for label, p in zip(labels, per_model):
        d, eps = p.get("density"), p.get("epsilon")
        if eps is not None and d is not None and d < 1 and not (0 < d - eps and d + eps < 1):
            raise ConfigError(f"{where}: model {label}: density ± epsilon ({d} ± {eps}) must lie inside (0, 1)")


def _check_gamma(where: str, labels: Sequence[str], shared: Mapping, per_model: Sequence[Mapping]) -> None:
    for label, p in zip(labels, per_model):
        g = p.get("gamma")
        if g is not None and not 0 <= g <= 1:
            raise ConfigError(f"{where}: gamma {g} of model {label} is outside [0, 1]")


def _check_weight_sum(where: str, labels: Sequence[str], shared: Mapping, per_model: Sequence[Mapping]) -> None:
    if shared.get("normalize"):
        total = sum(p["weight"] for p in per_model)
        if abs(total) < 1e-12:
            weights = ", ".join(f"{p['weight']:g}" for p in per_model)
            raise ConfigError(f"{where}: the linear weights sum to 0 and normalize is on (weights: {weights})")


def _check_fraction(key: str) -> Check:
    def check(where: str, labels: Sequence[str], shared: Mapping, per_model: Sequence[Mapping]) -> None:
        if not 0 <= shared[key] <= 1:
            raise ConfigError(f"{where}: {key} {shared[key]} is outside [0, 1]")

    return check


# ---------------------------------------------------------------------------------------------------------------
# The rows

_M = "weightsmith.merge.methods"
_RAM_EPSILON = Param(name="epsilon", default=1e-5, arg="epsilon", help="|δ| above which a model changed an entry")
# Defaults follow mergekit 0.1.5's registry so that its YAML files mean the same here.
_TA = "Ilharco et al. 2023, arXiv:2212.04089"
_TIES = "Yadav et al. 2023, arXiv:2306.01708"
_DARE = "Yu et al. 2024, arXiv:2311.03099"
_CRUMBS = "Davari & Belilovsky 2023, arXiv:2312.06795"
_DELLA = "Deep et al. 2024, arXiv:2406.11617"
_WEIGHT = Param(name="weight", per_model=True, arg="weights", help="the model's weight")


def _family(name: str, row: FamilyRow, paper: str) -> Method:
    params = [
        _WEIGHT,
        Param(name="density", default=1.0, per_model=True, arg="densities", help="fraction of δᵢ kept"),
        Param(name="lambda", default=1.0, arg="lam", help="scale of the merged task vector"),
        Param(name="normalize", default=row.normalize, kind="bool", arg="normalize", help="divide by Σ weights"),
        Param(name="rescale", default=row.rescale, kind="bool", arg="rescale", help="rescale kept entries"),
        Param(name="int8_mask", default=False, kind="bool", help="a mergekit memory option; no numerical effect"),
    ]
    if row.consensus is not None:
        params.append(Param(name="consensus", default=row.consensus, kind="choice", choices=CONSENSUS, arg="consensus"))
    if row.sparsifier in ("random", "rank_random"):
        params.append(
            Param(
                name="rescale_mode",
                default=RESCALE_MODE,
                kind="choice",
                choices=RESCALE_MODES,
                arg="rescale_mode",
                help="survivors: 1/p (the papers) or l1 (mergekit's norm matching)",
            )
        )
    checks: list[Check] = [_check_density]
    if row.sparsifier == "outliers":
        params.append(
            Param(name="gamma", default=GAMMA, per_model=True, arg="gammas", help="fraction of largest |δ| dropped")
        )
        checks.append(_check_gamma)
    if row.sparsifier == "rank_random":
        params.append(
            Param(name="epsilon", default=EPSILON, per_model=True, arg="epsilons", help="spread of keep probabilities")
        )
        checks.append(_check_epsilon)
    return Method(
        name=name,
        function=f"{_M}:merge_task_vectors",
        shape="family",
        base="required",
        min_models=1,
        max_models=None,
        params=tuple(params),
        native=True,
        seeded=row.sparsifier in ("random", "rank_random"),
        stats=True,
        family=row,
        checks=tuple(checks),
        paper=paper,
    )


_ROWS: list[Method] = [
    Method(
        name="linear",
        function=f"{_M}:linear",
        shape="models",
        base="input",
        min_models=1,
        max_models=None,
        params=(_WEIGHT, Param(name="normalize", default=True, kind="bool", arg="normalize", help="divide by Σ w")),
        native=True,
        checks=(_check_weight_sum,),
        paper="Wortsman et al. 2022, arXiv:2203.05482",
    ),
    Method(
        name="slerp",
        function=f"{_M}:slerp",
        shape="base_other",
        base="required",
        min_models=1,
        max_models=1,
        params=(Param(name="t", arg="t", help="interpolation position (0 gives the base)"),),
        native=True,
        paper="Shoemake 1985",
    ),
    Method(
        name="nuslerp",
        function=f"{_M}:nuslerp",
        shape="two",
        base="optional",
        min_models=2,
        max_models=2,
        base_keyword=True,
        params=(
            _WEIGHT,
            Param(name="nuslerp_row_wise", default=False, kind="bool", arg="row_wise", help="slerp each column"),
            Param(name="nuslerp_flatten", default=True, kind="bool", arg="flatten", help="slerp the whole tensor"),
        ),
        paper="mergekit's nuslerp",
    ),
    Method(
        name="model_stock",
        function=f"{_M}:model_stock",
        shape="base_models",
        base="required",
        min_models=2,
        max_models=None,
        params=(Param(name="filter_wise", default=False, kind="bool", arg="filter_wise", help="cosines per row"),),
        paper="Jang et al. 2024, arXiv:2403.19522",
    ),
    Method(
        name="passthrough",
        function=f"{_M}:passthrough",
        shape="one",
        base="input",
        min_models=1,
        max_models=1,
        params=(Param(name="scale", default=None, per_model=True, arg="scale", help="multiply the tensor"),),
        identity=lambda shared, per_model: per_model[0]["scale"] is None,
        paper="mergekit's passthrough",
    ),
]
_ROWS += [
    _family(name, row, paper)
    for name, row, paper in (
        ("task_arithmetic", FamilyRow(sparsifier=None, consensus=None, normalize=False, rescale=False), _TA),
        ("ties", FamilyRow(sparsifier="magnitude", consensus="sum", normalize=True, rescale=False), _TIES),
        ("dare_linear", FamilyRow(sparsifier="random", consensus=None, normalize=False, rescale=True), _DARE),
        ("dare_ties", FamilyRow(sparsifier="random", consensus="sum", normalize=False, rescale=True), _DARE),
        ("breadcrumbs", FamilyRow(sparsifier="outliers", consensus=None, normalize=False, rescale=False), _CRUMBS),
        (
            "breadcrumbs_ties",
            FamilyRow(sparsifier="outliers", consensus="sum", normalize=False, rescale=False),
            _CRUMBS,
        ),
        ("della", FamilyRow(sparsifier="rank_random", consensus="sum", normalize=True, rescale=True), _DELLA),
        ("della_linear", FamilyRow(sparsifier="rank_random", consensus=None, normalize=False, rescale=True), _DELLA),
    )
]

_ROWS += [
    Method(
        name="sce",
        native=True,
        function="weightsmith.merge.selective:sce",
        shape="base_models",
        base="required",
        min_models=1,
        max_models=None,
        params=(
            Param(name="select_topk", default=1.0, arg="select_topk", help="fraction of entries kept by variance"),
            Param(name="int8_mask", default=False, kind="bool", help="a mergekit memory option; no numerical effect"),
        ),
        checks=(_check_fraction("select_topk"),),
        paper="Wan et al. 2024, arXiv:2408.07990",
    ),
    Method(
        name="karcher",
        native=True,
        function="weightsmith.merge.spherical:karcher",
        shape="models",
        base="input",
        min_models=1,
        max_models=None,
        params=(
            Param(name="max_iter", default=10, kind="int", arg="max_iter", help="Karcher iterations at most"),
            Param(name="tol", default=1e-5, arg="tol", help="convergence tolerance"),
        ),
        paper="Karcher 1977; mergekit's karcher",
    ),
    Method(
        name="multislerp",
        native=True,
        function="weightsmith.merge.spherical:multislerp",
        shape="models",
        base="optional",
        base_keyword=True,
        min_models=1,
        max_models=None,
        params=(
            _WEIGHT,
            Param(name="normalize_weights", default=True, kind="bool", arg="normalize_weights", help="Σw = 1"),
            Param(name="eps", default=1e-8, arg="eps", help="numerical floor"),
        ),
        paper="Goddard 2025, Multi-SLERP",
    ),
    Method(
        name="nearswap",
        native=True,
        function="weightsmith.merge.selective:nearswap",
        shape="base_other",
        base="required",
        min_models=1,
        max_models=1,
        params=(Param(name="t", arg="t", help="distance below which the other model's value is taken"),),
        paper="alchemonaut 2024, QuartetAnemoi; mergekit's nearswap",
    ),
    Method(
        name="arcee_fusion",
        native=True,
        function="weightsmith.merge.selective:arcee_fusion",
        shape="base_other",
        base="required",
        min_models=1,
        max_models=1,
        paper="Arcee AI 2025; mergekit's arcee_fusion",
    ),
    Method(
        name="ram",
        native=True,
        function="weightsmith.merge.selective:ram",
        shape="base_models",
        base="required",
        min_models=1,
        max_models=None,
        params=(_RAM_EPSILON,),
        paper="arXiv:2601.13572",
    ),
    Method(
        name="ramplus_tl",
        native=True,
        function="weightsmith.merge.selective:ramplus_tl",
        shape="base_models",
        base="required",
        min_models=1,
        max_models=None,
        params=(
            Param(name="r", default=0.1, arg="r", help="amplification of unique changes"),
            Param(name="alpha", default=0.2, arg="alpha", help="cap of the shared/unique ratio"),
            _RAM_EPSILON,
        ),
        paper="arXiv:2601.13572",
    ),
]

# The table, by name, in the order of the rows.
METHODS: dict[str, Method] = {row.name: row for row in _ROWS}


def names() -> tuple[str, ...]:
    """Every method name, in table order (the CLI's choices)."""
    return tuple(METHODS)


def cli_params() -> dict[str, tuple[Param, tuple[str, ...]]]:
    """Every parameter a flag can set on the command line (all but ``weight``), with the methods that take it."""
    found: dict[str, tuple[Param, tuple[str, ...]]] = {}
    for row in _ROWS:
        for p in row.params:
            if p.name == "weight":
                continue
            first, users = found.get(p.name, (p, ()))
            found[p.name] = (first, (*users, row.name))
    return found


def markdown() -> str:
    """The table as Markdown (docs/merge.md embeds it; a test keeps the two equal)."""
    lines = ["| method | base | models | parameters (default) | source |", "|---|---|---|---|---|"]
    for row in _ROWS:
        count = (
            f"{row.min_models}+"
            if row.max_models is None
            else (str(row.min_models) if row.min_models == row.max_models else f"{row.min_models}–{row.max_models}")
        )
        params = ", ".join(
            f"`{p.name}`" + ("" if p.default is REQUIRED else f" ({p.default})") + (" per model" if p.per_model else "")
            for p in row.params
        )
        lines.append(f"| `{row.name}` | {row.base} | {count} | {params or '—'} | {row.paper} |")
    return "\n".join(lines)
