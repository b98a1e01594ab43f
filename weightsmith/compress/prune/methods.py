"""Pruning methods as values: frozen, keyword-only configs that validate themselves and round-trip to JSON.

``prune(src, out, Magnitude(sparsity=0.5))`` looks the config's type up in ``RUNNERS`` (``weightsmith.compress.prune``)
to find the code that prunes. This module imports nothing heavy: the CLI builds its flags from these fields, and a
recipe step is checked by building its config.

    Magnitude(sparsity=0.5, scope="global")      |W|, per tensor or one threshold over all pruned tensors
    Wanda(sparsity=0.5, calibration="c.txt")     |W|·‖X‖ per output row
    NM(n=2, m=4)                                 N of every M consecutive inputs, by |W| or by Wanda's score
    StructuredFFN(ratio=0.25)                    FFN neurons removed, the config rewritten
    StructuredHeads(keep_heads=8)                attention heads removed, the config rewritten
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from weightsmith.errors import ConfigError

METHODS = ("magnitude", "wanda")  # the scores of unstructured and N:M pruning
SCOPES = ("layer", "global")
STRUCTURED = ("ffn", "heads")

# Calibration defaults shared by every method that measures activations: 64 lines of up to 128 tokens is Wanda's
# order of magnitude (the paper uses 128 × 2048 on 7B models) scaled to what a CPU runs in seconds.
_SAMPLES = 64
_SEQ_LEN = 128


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"`{name}` {value!r}: must be a number")
    return float(value)


def _fraction(value: Any, name: str) -> float:
    """A fraction in [0, 1): what is removed (1 would remove everything)."""
    number = _number(value, name)
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"{name} {value}: must be in [0, 1)")
    return number


def _check_calibration(config: Any) -> None:
    samples, seq_len = config.samples, config.seq_len
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (samples, seq_len)) or samples < 1 or seq_len < 2:
        raise ConfigError(f"samples {samples} / seq_len {seq_len}: need samples ≥ 1 and seq_len ≥ 2")
    if config.calibration is not None:
        object.__setattr__(config, "calibration", str(config.calibration))


class _Config:
    """What every method shares: its name in provenance and reports, and its JSON form."""

    name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True, kw_only=True)
class Magnitude(_Config):
    """Unstructured magnitude pruning: the entries of smallest |W| become zeros (Han et al. 2015). Data-free, streamed
    tensor by tensor, no transformers import."""

    name: ClassVar[str] = "magnitude"
    sparsity: float = field(metadata=_help("fraction of weights set to zero, in [0, 1)"))
    # "layer": each pruned tensor at exactly `sparsity`, the common default (no layer is emptied by accident);
    # "global": one threshold over all pruned tensors, exact overall.
    scope: str = field(
        default="layer",
        metadata=_help(
            "magnitude: the sparsity per tensor (layer) or over all pruned tensors (global)", choices=SCOPES
        ),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", _fraction(self.sparsity, "sparsity"))
        if self.scope not in SCOPES:
            raise ConfigError(f"scope {self.scope!r}: expected one of {', '.join(SCOPES)}")


@dataclass(frozen=True, kw_only=True)
class Wanda(_Config):
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, the lowest `sparsity` of each output row go. The model runs once
    over the calibration text, block by block, each block pruned before the next one is measured."""

    name: ClassVar[str] = "wanda"
    sparsity: float = field(metadata=_help("fraction of weights set to zero, in [0, 1)"))
    calibration: str = field(
        metadata=_help("text file (one sample per line) for wanda or activation-scored structured pruning")
    )
    samples: int = field(default=_SAMPLES, metadata=_help(f"calibration lines used (default {_SAMPLES})"))
    seq_len: int = field(default=_SEQ_LEN, metadata=_help(f"tokens per calibration line at most (default {_SEQ_LEN})"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", _fraction(self.sparsity, "sparsity"))
        _check_calibration(self)


@dataclass(frozen=True, kw_only=True)
class NM(_Config):
    """N:M semi-structured sparsity (Mishra et al. 2021): in every group of `m` consecutive inputs of a row the `n`
    highest scores stay; scored by |W| (``criterion="magnitude"``) or Wanda's |W|·‖X‖ (needs `calibration`)."""

    name: ClassVar[str] = "nm"
    # 2:4: the one pattern sparse tensor cores run (Ampere and later)
    n: int = 2
    m: int = 4
    criterion: str = "magnitude"
    calibration: str | None = None
    samples: int = _SAMPLES
    seq_len: int = _SEQ_LEN

    def __post_init__(self) -> None:
        n, m = self.n, self.m
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)) or not 0 < n < m:
            raise ConfigError(f"pattern {n}:{m}: expected N:M with 0 < N < M, e.g. 2:4")
        if self.criterion not in METHODS:
            raise ConfigError(f"method {self.criterion!r}: expected one of {', '.join(METHODS)}")
        _check_calibration(self)
        _check_criterion(self.criterion, self.calibration)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, pattern: str, **options: Any) -> NM:
        """``NM.parse("2:4")``; refuses anything but 0 < N < M."""
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ConfigError(f"pattern {pattern!r}: expected N:M with 0 < N < M, e.g. 2:4")
        return cls(n=int(m.group(1)), m=int(m.group(2)), **options)


def _check_criterion(criterion: str, calibration: str | None) -> None:
    if criterion == "wanda" and calibration is None:
        raise ConfigError("wanda needs `calibration`: a text file run through the model to measure activations")
    if criterion == "magnitude" and calibration is not None:
        raise ConfigError("magnitude pruning is data-free: `calibration` is only for wanda or structured pruning")


@dataclass(frozen=True, kw_only=True)
class StructuredFFN(_Config):
    """FFN neurons removed from every block (the same number per block: the config holds one width per stack), scored
    by weight norms, or by activations with `calibration` (FLAP-style |W|·‖X‖ per neuron); see ``structured``."""

    name: ClassVar[str] = "ffn"
    ratio: float = field(metadata=_help("structured: fraction of neurons / heads removed per block"))
    calibration: str | None = None
    samples: int = _SAMPLES
    seq_len: int = _SEQ_LEN

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _fraction(self.ratio, "ratio"))
        _check_calibration(self)


@dataclass(frozen=True, kw_only=True)
class StructuredHeads(_Config):
    """Attention heads removed from every block: `ratio` of them, or all but `keep_heads`; scored like the FFN."""

    name: ClassVar[str] = "heads"
    ratio: float | None = None
    keep_heads: int | None = field(default=None, metadata=_help("structured heads: query heads kept per block"))
    calibration: str | None = None
    samples: int = _SAMPLES
    seq_len: int = _SEQ_LEN

    def __post_init__(self) -> None:
        if self.ratio is not None and self.keep_heads is not None:
            raise ConfigError("give `ratio` or `keep_heads`, not both")
        if self.ratio is None and self.keep_heads is None:
            raise ConfigError("`structured` heads needs `ratio` or `keep_heads`")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _fraction(self.ratio, "ratio"))
        if self.keep_heads is not None and (isinstance(self.keep_heads, bool) or not isinstance(self.keep_heads, int)):
            raise ConfigError(f"`keep_heads` {self.keep_heads!r}: must be a whole number")
        _check_calibration(self)


Method = Magnitude | Wanda | NM | StructuredFFN | StructuredHeads
CONFIGS: tuple[type, ...] = (Magnitude, Wanda, NM, StructuredFFN, StructuredHeads)


# -- the keyword form ---------------------------------------------------------------------------------------------

# How the keyword form (``prune(src, out, sparsity=0.5)``, the CLI's flags, a recipe step's mapping) picks a config:
# `structured` → StructuredFFN / StructuredHeads, else `pattern` → NM, else `method` → Magnitude / Wanda.
SELECTORS: dict[str, dict[str, Any]] = {
    "method": _help(
        "score: |W| (magnitude, data-free) or |W|·‖X‖ per output row (wanda, needs calibration); default magnitude",
        choices=METHODS,
    ),
    "pattern": _help("N:M semi-structured sparsity along the input dimension, e.g. 2:4"),
    "structured": _help(
        "remove FFN neurons or attention heads (a smaller model, config rewritten)", choices=STRUCTURED
    ),
}
_TYPES = {"float": float, "int": int, "str": str}


def keyword_options() -> dict[str, dict[str, Any]]:
    """Every keyword of the keyword form → {"type", "help", "choices"}: the selectors, then the configs' fields (the
    first config that documents a field gives its help). The CLI's flags are exactly these."""
    options = {name: {"type": str, **spec} for name, spec in SELECTORS.items()}
    for cls in CONFIGS:
        for f in fields(cls):
            if f.name in ("n", "m", "criterion"):  # NM's: spelt `pattern` "N:M" and `method`
                continue
            spec = options.setdefault(f.name, {"type": _TYPES[str(f.type).split(" |")[0]]})
            for key in ("help", "choices"):
                if key in f.metadata:
                    spec.setdefault(key, f.metadata[key])
    return options


def make_method(method: str | Method | dict | None = None, **options: Any) -> Method:
    """A config from a config, its ``to_dict()``, or the keyword form (``make_method(sparsity=0.5, scope="global")``,
    ``make_method(structured="ffn", ratio=0.25)``, ``make_method("wanda", pattern="2:4", calibration="c.txt")``).

    Options left at None are dropped, so a CLI can pass every flag; each combination that does not apply is refused
    in one line naming what does.
    """
    if isinstance(method, (Magnitude, Wanda, NM, StructuredFFN, StructuredHeads)):
        if options:
            raise ConfigError(f"{method.name}: pass options inside the config, not beside it ({', '.join(options)})")
        return method
    if isinstance(method, dict):
        options = {**method, **options}
        method = options.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise ConfigError(f"method {method!r}: expected a pruning config or one of {', '.join(METHODS)}")
    options = {k: v for k, v in options.items() if v is not None}
    by_name = {cls.name: cls for cls in (NM, StructuredFFN, StructuredHeads)}
    if method in by_name:  # a to_dict() of a config the keyword form spells differently
        return _construct(by_name[method], options)
    keywords = keyword_options()
    for name, value in options.items():
        if name not in keywords:
            raise ConfigError(f"unknown parameter {name!r} (accepted: {', '.join(keywords)})")
        expected = keywords[name]["type"]
        accepted = {float: (int, float), str: (str, os.PathLike)}.get(expected, expected)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"parameter {name!r} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    if "structured" in options:
        return _structured(method, options)
    return _unstructured(method or "magnitude", options)


def _construct(cls: Any, options: dict[str, Any]) -> Method:
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ConfigError(f"{cls.name}: option(s) {', '.join(unknown)} do not apply (valid: {', '.join(valid)})")
    return cls(**options)


def _calibration(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("calibration", "samples", "seq_len") if k in options}


def _unstructured(method: str, options: dict[str, Any]) -> Method:
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    scope, sparsity, pattern = options.get("scope", "layer"), options.get("sparsity"), options.get("pattern")
    if scope not in SCOPES:
        raise ConfigError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
    for name in ("ratio", "keep_heads"):
        if name in options:
            raise ConfigError(f"`{name}` is for `structured` pruning; unstructured pruning takes `sparsity`")
    if pattern is not None:
        nm = NM.parse(pattern)
        if sparsity is not None and abs(sparsity - (1 - nm.n / nm.m)) > 1e-9:
            raise ConfigError(f"sparsity {sparsity} contradicts pattern {pattern} (which means {1 - nm.n / nm.m})")
        if scope != "layer":
            raise ConfigError(f"pattern {pattern} is applied group by group: it has no global scope")
        return NM(n=nm.n, m=nm.m, criterion=method, **_calibration(options))
    if sparsity is None:
        raise ConfigError("unstructured pruning needs `sparsity` (or `pattern` N:M)")
    if method == "wanda":
        if scope == "global":
            raise ConfigError("wanda compares scores within each output row: it has no global scope")
        _check_criterion(method, options.get("calibration"))
        return Wanda(sparsity=sparsity, **_calibration(options))
    _check_criterion(method, options.get("calibration"))
    return Magnitude(sparsity=sparsity, scope=scope)


def _structured(method: str | None, options: dict[str, Any]) -> Method:
    kind = options["structured"]
    if kind not in STRUCTURED:
        raise ConfigError(f"structured {kind!r}: expected {' or '.join(STRUCTURED)}")
    if "sparsity" in options or "pattern" in options:
        raise ConfigError("structured pruning removes whole units: give `ratio`/`keep_heads`, not `sparsity`/`pattern`")
    if method not in (None, "magnitude") or options.get("scope", "layer") != "layer":
        raise ConfigError(
            "structured pruning is scored by weight norms, or by activations with `calibration`: "
            "`method`/`scope` do not apply"
        )
    if kind == "ffn":
        if "keep_heads" in options:
            raise ConfigError("`keep_heads` is for `structured` heads")
        if "ratio" not in options:
            raise ConfigError("`structured` ffn needs `ratio`")
        return StructuredFFN(ratio=options["ratio"], **_calibration(options))
    return StructuredHeads(ratio=options.get("ratio"), keep_heads=options.get("keep_heads"), **_calibration(options))
