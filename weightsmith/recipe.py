"""Recipes: a YAML list of steps (lora_merge, merge, prune, quantize, distill, export, export_gguf, convert), each
taking the same parameters as its command, the output of each feeding the next.

    input: ./base
    output: ./shipped
    steps:
      - lora_merge: {adapters: [./adapter]}
      - prune: {sparsity: 0.5}
      - quantize: {scheme: int8}

A step that offers a lazy view (``lora_merge``, data-free ``prune``, ``quantize``: tensors computed on read) streams
into a following step that streams too, without an intermediate checkpoint; other steps write their output, into a
temporary work directory unless they are last. Relative paths are relative to the working directory. Steps that
need the network (Wanda or structured pruning, distillation, ONNX export) build the model once from their input.
In a ``merge`` step, ``"@previous"`` names the output of the step before it.
Everything is checked before the first step runs (a prune, quantize, distill or export step by building its config
value, the others against the types of the verb's parameters); one Report covers the run, and every step's
provenance ends up in the output's metadata (safetensors, or the ONNX graph's).
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
from collections import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from weightsmith.checkpoint import check_destination
from weightsmith.checkpoint.staging import staging_dir, storage_errors
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.report import Report, collecting_figures, figures_requested
from weightsmith.units import format_size
from weightsmith.yamltext import load_mapping

PREVIOUS = "@previous"


@dataclass(frozen=True)
class StepKind:
    """One row of the step table: the library function a step calls and how it takes the running model."""

    function: str  # "module:function"
    source: str | None  # the parameter that receives the running model (None: merge names it with "@previous")
    streams: bool  # reads and writes tensor by tensor (False: builds the model)
    view: str | None = None  # "module:function" giving a lazy view instead of writing, when one exists
    # "module:function" building the step's config value from its parameter ``config_key`` (the method or scheme,
    # when the verb names one) and the keywords the function gathers (**): the step is checked by building it,
    # before anything runs
    config: str | None = None
    config_key: str | None = "method"

    def resolve(self):
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


STEPS: dict[str, StepKind] = {
    "lora_merge": StepKind("weightsmith.merge.lora:merge", "base", True, view="weightsmith.merge.lora:open_folded"),
    "merge": StepKind("weightsmith.merge:run", None, True),
    "prune": StepKind(
        "weightsmith.compress.prune:prune",
        "src",
        True,
        view="weightsmith.compress.prune:open_pruned",
        config="weightsmith.compress.prune:make_method",
    ),
    "quantize": StepKind(
        "weightsmith.compress.quantize:quantize",
        "src",
        True,
        view="weightsmith.compress.quantize:open_quantized",
        config="weightsmith.compress.quantize.schemes:make_scheme",
        config_key="scheme",
    ),
    "distill": StepKind(
        "weightsmith.compress.distill:distill",
        "teacher",
        False,
        config="weightsmith.compress.distill.config:make_config",
        config_key=None,
    ),
    "export": StepKind(
        "weightsmith.export:onnx", "src", False, config="weightsmith.export.to_onnx.config:make_export", config_key=None
    ),
    "export_safetensors": StepKind("weightsmith.export:safetensors", "src", True),
    "export_gguf": StepKind("weightsmith.export:gguf", "src", True),
    "convert": StepKind("weightsmith.conversion:convert", "src", True),
}
_MERGE_RUN_OPTIONS = ("seed", "workers", "shard_size")  # other keys of a merge step form the mergekit config
_WRITER_ONLY = ("shard_size",)  # meaningless for a step that hands a view on: nothing of it is written


@dataclass
class Step:
    index: int
    kind: str
    params: dict[str, Any]

    @property
    def row(self) -> StepKind:
        return STEPS[self.kind]

    def label(self) -> str:
        return f"recipe step {self.index} ({self.kind})"

    def materializes(self) -> bool:
        """True when this step builds the transformers model (and so needs its input as files)."""
        if self.kind == "prune":
            return bool(self.params.get("structured")) or self.params.get("method") == "wanda"
        return not self.row.streams


@dataclass
class Recipe:
    input: str | None
    output: str
    steps: list[Step]
    path: str = "recipe"
    report: str | None = None  # an HTML report of the whole run, a section per step


def load_recipe(source: str | os.PathLike | Mapping) -> Recipe:
    """Parse and check a recipe (YAML file or dict): step names, parameter names and types, before anything runs."""
    raw, where = load_mapping(source, "recipe", "input, output and steps")
    unknown = set(raw) - {"input", "output", "steps", "report"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected input, output, steps, report)"
        )
    if raw.get("report") is not None and not isinstance(raw["report"], str):
        raise ConfigError(f"{where}: 'report' must be a path (an .html file)")
    if not isinstance(raw.get("output"), str):
        raise ConfigError(f"{where}: 'output' must be a path")
    if not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise ConfigError(f"{where}: 'steps' must be a non-empty list")
    steps = [_parse_step(where, i, entry) for i, entry in enumerate(raw["steps"])]
    if raw.get("input") is not None and not isinstance(raw["input"], str):
        raise ConfigError(f"{where}: 'input' must be a path")
    if raw.get("input") is None and steps[0].kind != "merge":
        raise ConfigError(f"{where}: 'input' is required (only a recipe that starts with a merge can omit it)")
    for step in steps:
        if step.kind == "merge" and step.index == 0 and raw.get("input") is None and _mentions_previous(step.params):
            raise ConfigError(f"{where}: {step.label()}: {PREVIOUS} names nothing: the recipe has no input")
    return Recipe(raw.get("input"), raw["output"], steps, where, raw.get("report"))


def _parse_step(where: str, index: int, entry: Any) -> Step:
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise ConfigError(f"{where}: recipe step {index}: expected one mapping such as {{prune: {{sparsity: 0.5}}}}")
    ((kind, params),) = entry.items()
    if kind not in STEPS:
        raise ConfigError(f"{where}: recipe step {index}: unknown step {kind!r} (expected one of {', '.join(STEPS)})")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: recipe step {index} ({kind}): parameters must be a mapping")
    step = Step(index, kind, dict(params))
    if kind == "export":
        fmt = step.params.pop("format", "onnx")
        if fmt == "safetensors":
            step.kind = "export_safetensors"
        elif fmt != "onnx":
            raise ConfigError(f"{where}: {step.label()}: format {fmt!r}: expected onnx or safetensors")
    _check_params(where, step)
    return step


def _check_params(where: str, step: Step) -> None:
    """Names and simple types against the step function's own signature (the command's parameters)."""
    fn = step.row.resolve()
    sig = inspect.signature(fn)
    hints = get_type_hints(fn, localns=_type_checking_names())
    reserved = {"out", "force", *([step.row.source] if step.row.source else [])}
    if step.kind == "merge":
        params = {k: v for k, v in step.params.items() if k in _MERGE_RUN_OPTIONS}
    else:
        params = step.params
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for name, value in params.items():
        if name in reserved:
            raise ConfigError(f"{where}: {step.label()}: {name!r} is set by the recipe, not by a step")
        param = sig.parameters.get(name)
        if param is None:
            if takes_any:
                continue
            accepted = [p for p in sig.parameters if p not in reserved and p != "config"]
            raise ConfigError(f"{where}: {step.label()}: unknown parameter {name!r} (accepted: {', '.join(accepted)})")
        expected = _accepts(hints.get(name, Any), value)
        if expected is not None:
            raise ConfigError(
                f"{where}: {step.label()}: parameter {name!r} must be {expected}, got {type(value).__name__} {value!r}"
            )
    if step.row.config is not None:
        _check_config(where, step, sig, params)
    if step.kind == "lora_merge" and "adapters" in params:
        try:
            _adapters(params["adapters"])
        except (KeyError, TypeError, ValueError, ConfigError):
            raise ConfigError(
                f"{where}: {step.label()}: adapters must be a list of paths, 'path@weight' or "
                f"{{path, weight}} entries, got {params['adapters']!r}"
            ) from None
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind is p.KEYWORD_ONLY and p.name not in params
    ]
    missing += [
        p.name
        for p in list(sig.parameters.values())[1:]
        if p.default is p.empty
        and p.name not in params
        and p.kind is p.POSITIONAL_OR_KEYWORD
        and p.name not in reserved
        and p.name != "config"
    ]
    if missing:
        raise ConfigError(f"{where}: {step.label()}: missing parameter(s) {', '.join(missing)}")


def _check_config(where: str, step: Step, sig: inspect.Signature, params: dict[str, Any]) -> None:
    """Build the step's config from the parameters the function does not name itself (and the one naming its
    method or scheme)."""
    assert step.row.config is not None
    module, name = step.row.config.split(":")
    build = getattr(importlib.import_module(module), name)
    keywords = {k: v for k, v in params.items() if k not in sig.parameters}
    key, named = step.row.config_key, None
    if key is not None:
        default = sig.parameters[key].default if key in sig.parameters else None
        named = params.get(key, None if default is inspect.Parameter.empty else default)
    try:
        build(named, **keywords)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {step.label()}: {exc}") from None


def _type_checking_names() -> dict[str, Any]:
    """The names step modules import under ``TYPE_CHECKING`` only (so that ``--help`` stays free of torch), for
    resolving their annotations here, where the steps are about to run."""
    from weightsmith.checkpoint import TensorSource
    from weightsmith.report import Report

    return {"TensorSource": TensorSource, "Report": Report}


_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {  # a parameter's type -> the YAML values it admits
    bool: ((bool,), "a boolean"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
    type(None): ((type(None),), "null"),
}


def _accepts(hint: Any, value: Any) -> str | None:
    """None when the YAML ``value`` fits the parameter's type ``hint`` (resolved by ``typing.get_type_hints``), else
    what is expected. Lists and mappings are checked as such (their items by the function); any other class (a path,
    a checkpoint, a dtype, a scheme) is spelled in YAML as a string."""
    members = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    allowed: list[type] = []
    names: list[str] = []
    for member in members:
        origin = get_origin(member) or member
        if member in _SCALARS:
            types_, name = _SCALARS[member]
        elif origin in (list, tuple, abc.Sequence):
            types_, name = (list,), "a list"
        elif origin in (dict, abc.Mapping):
            types_, name = (dict,), "a mapping"
        elif isinstance(origin, type):
            types_, name = (str,), "a string"  # its YAML spelling: a path, a dtype name, a scheme name
        else:
            return None  # Any, a type variable, a callable: the function checks it
        allowed.extend(types_)
        names.append(name)
    if isinstance(value, bool) and bool not in allowed:
        return " or ".join(dict.fromkeys(names))
    return None if isinstance(value, tuple(allowed)) else " or ".join(dict.fromkeys(names))


def _mentions_previous(value: Any) -> bool:
    if isinstance(value, str):
        return value == PREVIOUS or value.startswith(PREVIOUS + "+")
    if isinstance(value, dict):
        return any(_mentions_previous(v) for v in value.values())
    if isinstance(value, list):
        return any(_mentions_previous(v) for v in value)
    return False


def _replace_previous(value: Any, path: str) -> Any:
    if isinstance(value, str) and (value == PREVIOUS or value.startswith(PREVIOUS + "+")):
        return path + value[len(PREVIOUS) :]
    if isinstance(value, dict):
        return {k: _replace_previous(v, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_previous(v, path) for v in value]
    return value


# -- planning ---------------------------------------------------------------------------------------------------


def plan(recipe: Recipe) -> list[dict]:
    """What each step reads, whether it streams, where it writes, and rough memory and size estimates."""
    rows = []
    model_bytes, largest = _input_sizes(recipe)
    for i, step in enumerate(recipe.steps):
        if i == 0:
            source = recipe.input or "the merge's models"
        else:
            source = f"step {i - 1} ({'lazy view' if _hands_view(recipe, i - 1) else 'files'})"
        if step.materializes():
            mode = "builds the model"
            peak = model_bytes * (4 if step.kind == "distill" else 2) + 600 * 10**6  # fp32 model(s) + torch runtime
        else:
            mode = "lazy view" if _hands_view(recipe, i) else "streams tensor by tensor"
            inputs = 1 + len(step.params.get("models", [])) if step.kind == "merge" else 2
            peak = largest * (inputs + 2) + 300 * 10**6
        model_bytes = _output_bytes(step, model_bytes)
        last = i == len(recipe.steps) - 1
        rows.append(
            {
                "step": i,
                "kind": step.kind,
                "input": source,
                "mode": mode,
                "output": recipe.output if last else "none (view)" if _hands_view(recipe, i) else "temporary",
                "est_peak_memory": format_size(peak),
                "est_output_size": format_size(model_bytes),
            }
        )
    return rows


def _input_sizes(recipe: Recipe) -> tuple[int, int]:
    from weightsmith.checkpoint import Checkpoint

    path = recipe.input or next(iter(_merge_models(recipe.steps[0])), None)
    try:
        ckpt = Checkpoint(path) if path else None
    except WeightsmithError:
        return 0, 0
    if ckpt is None:
        return 0, 0
    infos = ckpt.infos()
    return sum(i.nbytes for i in infos), max((i.nbytes for i in infos), default=0)


def _merge_models(step: Step) -> list[str]:
    models = [m.get("model") for m in step.params.get("models", []) if isinstance(m, dict)]
    return [m for m in models if isinstance(m, str) and not _mentions_previous(m)]


def _output_bytes(step: Step, size: int) -> int:
    """A rough size after the step (linear weights are most of a transformer's bytes)."""
    if step.kind == "quantize":
        return int(size * (0.3 if str(step.params.get("scheme", "int8")) in ("int8", "fp8") else 0.18))
    if step.kind == "prune" and step.params.get("structured"):
        return int(size * (1 - 0.6 * float(step.params.get("ratio") or 0.25)))
    if step.kind == "export" and step.params.get("quantize") == "int8":
        return int(size * 0.3)
    return size


def _hands_view(recipe: Recipe, i: int) -> bool:
    """Step i gives the next step a lazy view instead of writing: it has a view that takes all of the step's
    parameters, and the next step streams checkpoints it is handed (a step that builds the model, or a merge,
    which opens its models by path, gets files)."""
    if i + 1 >= len(recipe.steps):
        return False
    step, following = recipe.steps[i], recipe.steps[i + 1]
    if step.row.view is None or step.materializes() or following.row.source is None or following.materializes():
        return False
    module, name = step.row.view.split(":")
    accepted = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    return takes_any or all(k in accepted for k in step.params if k not in _WRITER_ONLY)


# -- running ----------------------------------------------------------------------------------------------------


def run(recipe: str | os.PathLike | Mapping | Recipe, *, dry_run: bool = False, force: bool = False) -> Report:
    """Run a recipe end to end (or, with ``dry_run``, only check it and return the plan).

    >>> ws.run("recipe.yaml")            # doctest: +SKIP
    >>> ws.run("recipe.yaml", dry_run=True).details["plan"]  # doctest: +SKIP
    """
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    output = Path(r.output)
    report = Report("run", output=str(output))
    report.details["plan"] = {f"step {row['step']}": row for row in plan(r)}
    report.summary.update(recipe=r.path, input=r.input, steps=[s.kind for s in r.steps])
    if r.input is not None and not Path(r.input).exists():
        raise ConfigError(f"{r.path}: input {r.input}: no such file or directory")
    check_destination(output, force)
    if r.report is not None:
        from weightsmith.report_html import check_report_path

        check_report_path(r.report, force)
    if dry_run:
        report.notes.append("dry run: nothing was read beyond headers and nothing was written")
        return report
    if r.report is not None:
        with collecting_figures():
            _run_steps(r, report, output, force)
        from weightsmith.report_html import write_html

        write_html(report, r.report, force=force)
        report.summary["report"] = r.report
    else:
        _run_steps(r, report, output, force)
    return report


def _run_steps(r: Recipe, report: Report, output: Path, force: bool) -> None:
    with storage_errors(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        work = staging_dir(output, "recipe")  # intermediate results; named so a later run can clean up after a kill
    current: Any = r.input
    try:
        with report.timed("total"):
            for i, step in enumerate(r.steps):
                last = i == len(r.steps) - 1
                with report.timed(f"step {i} {step.kind}"):
                    current = _run_step(r, step, current, work, output, last, force, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.summary["output_size"] = _size_of(output)


def _run_step(
    r: Recipe, step: Step, current: Any, work: Path, output: Path, last: bool, force: bool, report: Report
) -> Any:
    params = dict(step.params)
    if step.kind == "lora_merge":
        params["adapters"] = _adapters(params.get("adapters", []))
    try:
        if _hands_view(r, step.index) and step.row.view is not None:
            module, name = step.row.view.split(":")
            view_params = {k: v for k, v in params.items() if k not in _WRITER_ONLY}
            view = getattr(importlib.import_module(module), name)(current, **view_params)
            report.details[f"step {step.index} {step.kind}"] = {"streamed": "lazy view, nothing written"}
            return view
        out = output if last else work / f"{step.index}-{step.kind}"
        if step.kind == "export":
            out = out / "model.onnx"
        fn = step.row.resolve()
        if step.kind == "merge":
            config = {k: v for k, v in params.items() if k not in _MERGE_RUN_OPTIONS}
            if current is not None:
                config = _replace_previous(config, str(current))
            options = {k: v for k, v in params.items() if k in _MERGE_RUN_OPTIONS}
            sub = fn(config, out, force=force and last, **options)
        else:
            assert step.row.source is not None  # only merge steps have none
            sub = fn(**{step.row.source: current}, out=out, force=force and last, **params)
    except WeightsmithError as exc:
        raise type(exc)(f"{step.label()}: {exc}") from None
    report.details[f"step {step.index} {step.kind}"] = {**sub.summary, **sub.details}
    if figures_requested():  # the HTML report draws each step from its own report
        report.figures.setdefault("steps", {})[f"step {step.index} {step.kind}"] = sub.to_dict()
    report.notes += [f"step {step.index}: {n}" for n in sub.notes]
    return out.parent if step.kind == "export" else out


def _adapters(value: Any) -> list[tuple[str, float]]:
    """``adapters`` of a lora_merge step: ``path``, ``path@weight`` or ``{path, weight}`` entries."""
    from weightsmith.units import parse_weighted

    entries = [value] if isinstance(value, (str, dict)) else list(value)
    return [parse_weighted(a) if isinstance(a, str) else (str(a["path"]), float(a.get("weight", 1.0))) for a in entries]


def _size_of(path: Path) -> str:
    if path.is_file():
        return format_size(path.stat().st_size)
    return format_size(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
