"""mergekit-compatible merge configs: YAML (or a dict) → a validated ``MergeConfig``, and per-tensor parameters.

Accepted as mergekit writes them: ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, top-level
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``. A parameter value is a scalar, a gradient (a list of
numbers interpolated piecewise-linearly over the layers, t = layer/(L−1); tensors outside the layers take t = 0), or
a list of ``{filter, value}`` (the first entry whose filter is a substring of the tensor name wins; an entry without
a filter, or with ``*``, matches everything). Per-model settings take precedence over top-level ones. A key
weightsmith does not support (``slices``, ``modules``, ``tokenizer``, ``chat_template``, an unknown parameter…) is
refused by name, never ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weightsmith.architecture import layer_index
from weightsmith.errors import ConfigError
from weightsmith.merge.methods import FAMILY
from weightsmith.yamltext import load_mapping, parse_mapping

REQUIRED = object()  # marks a parameter without default

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_MERGEKIT_ONLY = {"slices", "modules", "tokenizer", "chat_template"}  # mergekit keys weightsmith does not implement


@dataclass(frozen=True)
class MethodSpec:
    """What a method takes: how it uses the base, how many models, and its parameters with defaults."""

    base: str  # "required" | "optional" (used as θ_b when given) | "input" (an ordinary input when given)
    min_models: int  # counted without the base, except for base="input" (counted with it)
    max_models: int | None
    shared: dict[str, Any] = field(default_factory=dict)  # one value per tensor (top-level parameters only)
    per_model: dict[str, Any] = field(default_factory=dict)  # one value per model per tensor


def _family_spec(name: str) -> MethodSpec:
    row = FAMILY[name]
    shared: dict[str, Any] = {
        "normalize": row.normalize,
        "rescale": row.rescale,
        "lambda": 1.0,
        "int8_mask": False,
    }  # int8_mask: a mergekit memory option; no numerical effect
    per_model: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if row.consensus is not None:
        shared["consensus"] = row.consensus  # weightsmith: "sum" (TIES) or "count"
    if row.sparsifier in ("random", "rank_random"):
        # The papers rescale survivors by 1/p (unbiased per entry); mergekit matches the L1 norm instead ("l1").
        shared["rescale_mode"] = "1/p"
    if row.sparsifier == "outliers":
        per_model["gamma"] = 0.01  # mergekit's default: drop the top 1% as outliers
    if row.sparsifier == "rank_random":
        per_model["epsilon"] = 0.15  # mergekit's default spread of keep probabilities
    return MethodSpec("required", 1, None, shared, per_model)


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("input", 1, None, {"normalize": True}, {"weight": REQUIRED}),
    "slerp": MethodSpec("required", 1, 1, {"t": REQUIRED}),
    "nuslerp": MethodSpec("optional", 2, 2, {"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": REQUIRED}),
    "model_stock": MethodSpec("required", 2, None, {"filter_wise": False}),
    "passthrough": MethodSpec("input", 1, 1, {}, {"scale": None}),
    **{name: _family_spec(name) for name in FAMILY},
}

_BOOL = {"normalize", "rescale", "int8_mask", "nuslerp_row_wise", "nuslerp_flatten", "filter_wise"}
_STR = {"consensus": ("sum", "count"), "rescale_mode": ("1/p", "l1")}


@dataclass(frozen=True)
class ModelRef:
    """One input: a checkpoint path (``path+adapter`` folds a LoRA adapter on the fly) and its own parameters."""

    path: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge: ``inputs`` are the method's inputs in order (the base first where it is an input)."""

    method: str
    inputs: tuple[ModelRef, ...]
    base: ModelRef | None  # θ_b for methods that use one (not repeated in inputs)
    parameters: Mapping[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None

    def to_dict(self) -> dict:
        return {
            "merge_method": self.method,
            "base_model": self.base.path if self.base else None,
            "models": [{"model": m.path, "parameters": dict(m.parameters)} for m in self.inputs],
            "parameters": dict(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
        }


def load_config(source: str | os.PathLike | Mapping) -> MergeConfig:
    """Read a mergekit-style config from a YAML file, YAML text or a dict, and validate it (no files opened)."""
    expected = "merge_method and models"
    text = source if isinstance(source, str) else None
    if text is not None and (len(text) >= 4096 or "\n" in text or text.lstrip().startswith("{")):  # YAML inline
        return _validate(parse_mapping(text, "config", expected), "config")
    return _validate(*load_mapping(source, "config", expected))


def _validate(raw: dict, where: str) -> MergeConfig:
    for key in raw:
        if key in _MERGEKIT_ONLY:
            raise ConfigError(f"{where}: mergekit key {key!r} is not supported by weightsmith merge")
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (expected one of {', '.join(sorted(_TOP_KEYS))})")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown merge_method {method!r} (supported: {', '.join(METHODS)})")
    spec = METHODS[method]
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    refs = [_model_ref(m, where) for m in models]
    base_path = raw.get("base_model")
    if base_path is not None and not isinstance(base_path, str):
        raise ConfigError(f"{where}: base_model must be a path, got {base_path!r}")
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        raise ConfigError(f"{where}: top-level 'parameters' must be a mapping")
    allowed = set(spec.shared) | set(spec.per_model)
    for key in top:
        if key not in allowed:
            raise ConfigError(
                f"{where}: parameter {key!r} is not a parameter of {method} "
                f"(it takes {', '.join(sorted(allowed)) or 'none'})"
            )
    for ref in refs:
        for key in ref.parameters:
            if key in spec.shared:
                raise ConfigError(
                    f"{where}: parameter {key!r} of {method} is global: set it under the top-level "
                    f"'parameters', not under model {ref.path}"
                )
            if key not in spec.per_model:
                raise ConfigError(
                    f"{where}: model {ref.path}: parameter {key!r} is not a parameter of {method} "
                    f"(per-model: {', '.join(sorted(spec.per_model)) or 'none'})"
                )

    base = None
    if base_path is not None:
        base = next((r for r in refs if _same(r.path, base_path)), ModelRef(base_path, {}))
    if spec.base == "required" and base is None:
        raise ConfigError(f"{where}: {method} needs a base_model")
    if spec.base == "input":
        inputs = list(refs) + ([base] if base is not None and base not in refs else [])
        inputs.sort(key=lambda r: 0 if base is not None and r is base else 1)  # base first, order kept otherwise
        used_base = None
        count, what = len(inputs), "models"
    else:
        inputs = [r for r in refs if base is None or r is not base]
        used_base = base
        count, what = len(inputs), "models besides the base"
    if count < spec.min_models or (spec.max_models is not None and count > spec.max_models):
        want = (
            str(spec.min_models)
            if spec.max_models == spec.min_models
            else f"at least {spec.min_models}"
            if spec.max_models is None
            else f"{spec.min_models}–{spec.max_models}"
        )
        raise ConfigError(f"{where}: {method} takes {want} {what}, got {count}: {', '.join(r.path for r in inputs)}")
    for name in (raw.get("dtype"), raw.get("out_dtype")):
        if name is not None:
            from weightsmith.units import parse_dtype

            parse_dtype(name)
    tok = raw.get("tokenizer_source")
    if tok is not None and tok not in ("base", "first") and not any(_same(r.path, tok) for r in refs + [base] if r):
        raise ConfigError(
            f"{where}: tokenizer_source {tok!r} is not supported (use base, first, or the path of one of the models)"
        )
    return MergeConfig(method, tuple(inputs), used_base, top, raw.get("dtype"), raw.get("out_dtype"), tok)


def _model_ref(entry: Any, where: str) -> ModelRef:
    if isinstance(entry, str):
        return ModelRef(entry, {})
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where}: each entry of 'models' needs a 'model' path, got {entry!r}")
    extra = set(entry) - {"model", "parameters"}
    if extra:
        raise ConfigError(f"{where}: model {entry['model']}: unsupported key {sorted(extra)[0]!r}")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: model {entry['model']}: 'parameters' must be a mapping")
    return ModelRef(str(entry["model"]), params)


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


# ---------------------------------------------------------------------------------------------------------------
# Per-tensor resolution


def gradient_position(name: str, num_layers: int) -> float:
    """mergekit's t: layer/(L−1) inside the blocks (1 when L = 1), 0 for embeddings, final norm and head."""
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, name: str, t: float) -> Any:
    """A parameter's value for tensor ``name`` at gradient position ``t`` (None when no filter matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if not isinstance(setting, list):
        raise ConfigError(f"parameter value {setting!r}: expected a scalar, a list or a list of {{filter, value}}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_number(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ConfigError(f"parameter entry {cond!r}: expected {{filter: SUBSTRING, value: VALUE}}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in name:
            return evaluate(cond["value"], name, t)
    return None


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            return value
    return value


def _typed(key: str, value: Any, where: str) -> Any:
    if key in _BOOL:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: parameter {key!r} must be true or false, got {value!r}")
    if key in _STR:
        if value in _STR[key]:
            return value
        raise ConfigError(f"{where}: parameter {key!r} must be one of {', '.join(_STR[key])}, got {value!r}")
    value = _number(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: parameter {key!r} must be a finite number, got {value!r}")
    return float(value)


def resolve(config: MergeConfig, name: str, t: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(shared parameters, one dict per input) for tensor ``name``: per-model settings first, then top-level, then
    the method's defaults. Raises ConfigError naming the tensor when a required parameter has no value."""
    spec = METHODS[config.method]
    where = f"tensor {name!r}"

    def pick(key: str, default: Any, scopes: list[Mapping[str, Any]], who: str) -> Any:
        for scope in scopes:
            if key in scope:
                value = evaluate(scope[key], name, t)
                if value is not None:
                    return _typed(key, value, where)
        if default is REQUIRED:
            raise ConfigError(f"{where}: no value for parameter {key!r} of {who} (set it per model or top-level)")
        return default

    shared = {k: pick(k, d, [config.parameters], config.method) for k, d in spec.shared.items()}
    per_model = [
        {k: pick(k, d, [ref.parameters, config.parameters], f"model {ref.path}") for k, d in spec.per_model.items()}
        for ref in config.inputs
    ]
    return shared, per_model
