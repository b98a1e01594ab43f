"""mergekit-compatible merge configs: YAML (or a dict) → a validated ``MergeConfig``, and per-tensor parameters.

Accepted as mergekit writes them: ``merge_method``, ``base_model``, ``models: [{model, parameters}]`` or ``slices:
[{sources: [{model, layer_range, parameters}], base_model, parameters}]``, top-level ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source``, ``tokenizer`` and ``chat_template``; a model is a path or a Hub id. A parameter
value is a scalar, a gradient (a list of numbers interpolated piecewise-linearly over the layers, t = layer/(L−1);
tensors outside the layers take t = 0), or a list of ``{filter, value}`` (the first entry whose filter is a
substring of the tensor name wins; an entry without a filter, or with ``*``, matches everything). Per-model (per-
source) settings take precedence over a slice's, and those over top-level ones. A key weightsmith does not support
(``modules``, an unknown parameter…) is refused by name, never ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weightsmith.architecture import layer_index
from weightsmith.errors import ConfigError
from weightsmith.merge.chat import check_chat_template
from weightsmith.merge.table import METHODS, REQUIRED, Method, Param
from weightsmith.merge.vocab import TokenizerSpec, check_source, parse_tokenizer
from weightsmith.yamltext import load_mapping, parse_mapping

_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
_MERGEKIT_ONLY = {"modules"}  # mergekit keys weightsmith does not implement


@dataclass(frozen=True)
class ModelRef:
    """One input: a checkpoint path or Hub id (``path+adapter`` folds a LoRA adapter on the fly), its own
    parameters, and in a slice the [start, end) range of its layers."""

    path: str
    parameters: Mapping[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class SliceConfig:
    """One output slice: its sources (the method's inputs, each with a layer range of the same length), the base
    among them where the method uses one, and the slice's own parameters (between the sources' and the top-level
    ones in precedence)."""

    inputs: tuple[ModelRef, ...]
    base: ModelRef | None
    parameters: Mapping[str, Any]

    @property
    def length(self) -> int:
        first = (self.base or self.inputs[0]).layer_range
        return first[1] - first[0] if first else 0

    def sources(self) -> list[ModelRef]:
        """The base (if any) then the inputs."""
        return ([self.base] if self.base else []) + list(self.inputs)


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
    slices: tuple[SliceConfig, ...] = ()  # when given, ``inputs`` and ``base`` are those of the first slice
    tokenizer: TokenizerSpec | None = None  # an output vocabulary to re-index embeddings and heads into
    chat_template: str | None = None  # auto, a bundled name or a Jinja template (see ``chat``)

    def to_dict(self) -> dict:
        if self.slices:
            layout: dict[str, Any] = {
                "slices": [
                    {
                        "sources": [
                            {
                                "model": m.path,
                                "layer_range": list(m.layer_range or ()),
                                "parameters": dict(m.parameters),
                            }
                            for m in sl.sources()
                        ],
                        "parameters": dict(sl.parameters),
                    }
                    for sl in self.slices
                ]
            }
        else:
            layout = {"models": [{"model": m.path, "parameters": dict(m.parameters)} for m in self.inputs]}
        return {
            "merge_method": self.method,
            "base_model": self.base.path if self.base else None,
            **layout,
            "parameters": dict(self.parameters),
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
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
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{where}: unknown merge_method {method!r} (supported: {', '.join(METHODS)})")
    spec = METHODS[method]
    base_path = raw.get("base_model")
    if base_path is not None and not isinstance(base_path, str):
        raise ConfigError(f"{where}: base_model must be a model path or Hub id, got {base_path!r}")
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        raise ConfigError(f"{where}: top-level 'parameters' must be a mapping")
    _check_keys(spec, method, top, [], where, "top-level")
    models, slices_raw = raw.get("models"), raw.get("slices")
    if (models is None) == (slices_raw is None):
        raise ConfigError(f"{where}: give exactly one of 'models' and 'slices'")
    slices: tuple[SliceConfig, ...] = ()
    if slices_raw is not None:
        slices = _slices(slices_raw, spec, method, base_path, where)
        refs = [r for sl in slices for r in sl.sources()]
        inputs, used_base = list(slices[0].inputs), slices[0].base
    else:
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
        refs = [_model_ref(m, where) for m in models]
        _check_keys(spec, method, {}, refs, where, "top-level")
        inputs, used_base = _arrange(spec, method, refs, base_path, where)
        base = used_base or next((r for r in inputs if base_path is not None and _same(r.path, base_path)), None)
        refs = refs + ([base] if base is not None and base not in refs else [])
    for name in (raw.get("dtype"), raw.get("out_dtype")):
        if name is not None:
            from weightsmith.units import parse_dtype

            parse_dtype(name)
    tok = raw.get("tokenizer_source")
    names = list(dict.fromkeys(r.path for r in refs))
    tokenizer = None
    if tok is not None and raw.get("tokenizer") is not None:
        raise ConfigError(f"{where}: give tokenizer_source or a tokenizer section, not both")
    if tok is not None and tok != "first":  # "first": carry the first model's tokenizer files (weightsmith's own)
        tokenizer = TokenizerSpec(check_source(tok, names, where, "tokenizer_source"))
    elif raw.get("tokenizer") is not None:
        tokenizer = parse_tokenizer(raw["tokenizer"], names, where)
    return MergeConfig(
        method,
        tuple(inputs),
        used_base,
        top,
        raw.get("dtype"),
        raw.get("out_dtype"),
        tok,
        slices=slices,
        tokenizer=tokenizer,
        chat_template=None if raw.get("chat_template") is None else check_chat_template(raw["chat_template"], where),
    )


def _check_keys(spec: Method, method: str, scope: Mapping, refs: list[ModelRef], where: str, what: str) -> None:
    """Parameters a scope (top-level or a slice) and its models may set."""
    allowed = set(spec.shared) | set(spec.per_model)
    for key in scope:
        if key not in allowed:
            raise ConfigError(
                f"{where}: parameter {key!r} is not a parameter of {method} "
                f"(it takes {', '.join(sorted(allowed)) or 'none'})"
            )
    for ref in refs:
        for key in ref.parameters:
            if key in spec.shared:
                raise ConfigError(
                    f"{where}: parameter {key!r} of {method} is global: set it under the {what} "
                    f"'parameters', not under model {ref.path}"
                )
            if key not in spec.per_model:
                raise ConfigError(
                    f"{where}: model {ref.path}: parameter {key!r} is not a parameter of {method} "
                    f"(per-model: {', '.join(sorted(spec.per_model)) or 'none'})"
                )


def _arrange(
    spec: Method, method: str, refs: list[ModelRef], base_path: str | None, where: str, in_slice: bool = False
) -> tuple[list[ModelRef], ModelRef | None]:
    """The method's inputs in order and the base it uses, checked against the row's base policy and counts."""
    base = None
    if base_path is not None:
        base = next((r for r in refs if _same(r.path, base_path)), None)
        if base is None and in_slice and spec.base != "input":
            raise ConfigError(f"{where}: base_model {base_path} is not among the slice's sources")
        if base is None:
            base = ModelRef(base_path, {})
    if spec.base == "required" and base is None:
        raise ConfigError(f"{where}: {method} needs a base_model")
    if spec.base == "input":
        if in_slice:
            base = next((r for r in refs if base_path is not None and _same(r.path, base_path)), None)
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
    return inputs, used_base


def _slices(raw: Any, spec: Method, method: str, base_path: str | None, where: str) -> tuple[SliceConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'slices' must be a non-empty list of {{sources: [{{model, layer_range}}]}}")
    out = []
    for i, entry in enumerate(raw):
        at = f"{where}: slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise ConfigError(f"{at}: each slice needs 'sources', a non-empty list of {{model, layer_range}}")
        extra = set(entry) - {"sources", "base_model", "parameters"}
        if extra:
            raise ConfigError(
                f"{at}: unsupported key {sorted(extra)[0]!r} (a slice takes sources, base_model, parameters)"
            )
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{at}: 'parameters' must be a mapping")
        refs = [_model_ref(src, at, sliced=True) for src in entry["sources"]]
        lengths = {r.path: r.layer_range[1] - r.layer_range[0] for r in refs if r.layer_range}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{p} {list(r.layer_range or ())}" for r in refs for p in [r.path])
            raise ConfigError(
                f"{at}: the sources' layer_range lengths differ ({shown}): give every source of a slice as many layers"
            )
        _check_keys(spec, method, params, refs, at, "slice's")
        inputs, base = _arrange(spec, method, refs, entry.get("base_model", base_path), at, in_slice=True)
        out.append(SliceConfig(tuple(inputs), base, params))
    return tuple(out)


def _model_ref(entry: Any, where: str, sliced: bool = False) -> ModelRef:
    if isinstance(entry, str) and not sliced:
        return ModelRef(entry, {})
    what = "'sources'" if sliced else "'models'"
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(f"{where}: each entry of {what} needs a 'model' path or Hub id, got {entry!r}")
    keys = {"model", "parameters", "layer_range"} if sliced else {"model", "parameters"}
    extra = set(entry) - keys
    if extra:
        raise ConfigError(f"{where}: model {entry['model']}: unsupported key {sorted(map(str, extra))[0]!r}")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: model {entry['model']}: 'parameters' must be a mapping")
    span = None
    if sliced:
        span = entry.get("layer_range")
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            or not 0 <= span[0] < span[1]
        ):
            raise ConfigError(
                f"{where}: model {entry['model']}: layer_range must be [start, end) with 0 <= start < end, got {span!r}"
            )
        span = (span[0], span[1])
    return ModelRef(str(entry["model"]), params, span)


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


def _typed(param: Param, value: Any, where: str) -> Any:
    key = param.name
    if param.kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: parameter {key!r} must be true or false, got {value!r}")
    if param.kind == "choice":
        if value in param.choices:
            return value
        raise ConfigError(f"{where}: parameter {key!r} must be one of {', '.join(param.choices)}, got {value!r}")
    value = _number(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: parameter {key!r} must be a finite number, got {value!r}")
    if param.kind == "int":
        if value != int(value):
            raise ConfigError(f"{where}: parameter {key!r} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def resolve(
    config: MergeConfig, name: str, t: float, part: SliceConfig | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(shared parameters, one dict per input) for tensor ``name``: per-model settings first, then the slice's
    (``part``), then top-level, then the method's defaults. Raises ConfigError naming the tensor when a required
    parameter has no value."""
    spec = METHODS[config.method]
    where = f"tensor {name!r}"

    def pick(param: Param, scopes: list[Mapping[str, Any]], who: str) -> Any:
        for scope in scopes:
            if param.name in scope:
                value = evaluate(scope[param.name], name, t)
                if value is not None:
                    return _typed(param, value, where)
        if param.default is REQUIRED:
            raise ConfigError(
                f"{where}: no value for parameter {param.name!r} of {who} (set it per model or top-level)"
            )
        return param.default

    scopes = [part.parameters, config.parameters] if part is not None else [config.parameters]
    inputs = part.inputs if part is not None else config.inputs
    shared = {p.name: pick(p, scopes, config.method) for p in spec.params if not p.per_model}
    per_model = [
        {p.name: pick(p, [ref.parameters, *scopes], f"model {ref.path}") for p in spec.params if p.per_model}
        for ref in inputs
    ]
    return shared, per_model
