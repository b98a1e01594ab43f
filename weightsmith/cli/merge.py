"""merge: a mergekit-style YAML, or the short form with flags."""

from __future__ import annotations

from typing import Any

from weightsmith.cli.common import add_command, add_output_options, yaml_mapping
from weightsmith.merge import table
from weightsmith.units import parse_weighted

_DEST = "param_"  # argparse destination prefix of the method parameters' flags


def register(sub) -> None:
    p = add_command(
        sub,
        "merge",
        help="merge fine-tunes of one base (mergekit YAML or flags), streamed tensor by tensor",
        description=f"Merge models with one of: {', '.join(table.names())}. "
        "Give a mergekit YAML config (a mergekit-moe config, with experts:, builds a Mixtral), "
        "or the method and models as flags. "
        "A model written BASE+ADAPTER folds a LoRA adapter into BASE on the fly.",
        examples=[
            "weightsmith merge ties.yaml -o ./merged",
            "weightsmith merge ties.yaml -o ./merged --workers 2 --seed 1",
            "weightsmith merge --method ties --base ./base --model ./ft-a@0.6 --model ./ft-b@0.4 "
            "--density 0.5 -o ./merged",
            "weightsmith merge --method slerp --base ./a --model ./b --t 0.3 -o ./merged",
            "weightsmith merge --method linear --model ./a --model ./b+./lora -o ./merged --dtype bf16",
        ],
    )
    p.add_argument("config", nargs="?", help="mergekit-style YAML config (omit to use --method and --model)")
    p.add_argument("--method", choices=table.names(), help="merge method (short form)")
    p.add_argument("--base", help="base model (short form)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH[@WEIGHT]",
        help="a model to merge (a path, or a Hub id ORG/NAME[#REVISION]), optionally with its weight "
        "(repeat; short form)",
    )
    _add_parameter_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods (default 0)")
    p.add_argument("--workers", type=int, default=1, help="tensors merged at once (output does not depend on it)")
    add_output_options(p)
    p.set_defaults(handler=_merge, inputs=_inputs)


def _add_parameter_flags(p) -> None:
    """One flag per method parameter of the table (the weight comes with each --model): numbers take a value,
    booleans come as --NAME / --no-NAME, choices list their values; help names the methods and the default."""
    for name, (param, users) in table.cli_params().items():
        flag = "--" + name.replace("_", "-")
        default = "" if param.default is table.REQUIRED else f"; default {param.default}"
        if len(users) > 1 and len({table.METHODS[u].param(name).default for u in users}) > 1:
            default = "; default per method"
        text = f"{param.help or name} ({', '.join(users)}{default})".replace("%", "%%")
        dest = _DEST + name
        if param.kind == "bool":
            p.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
            p.add_argument("--no-" + flag[2:], dest=dest, action="store_false", help=f"do not: {flag}")
        elif param.kind == "choice":
            p.add_argument(flag, dest=dest, choices=param.choices, help=text)
        else:
            kind = int if param.kind == "int" else float
            p.add_argument(flag, dest=dest, type=kind, metavar=name.upper(), help=text)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _inputs(args) -> list[str]:
    """The checkpoints a merge reads (for hashing ahead); a config that cannot be read yields none of its own."""
    specs: list[Any] = [args.base, *args.model]
    if args.config:
        raw = yaml_mapping(args.config)
        models = _list(raw.get("models"))
        specs += [raw.get("base_model")] + [m.get("model") for m in models if isinstance(m, dict)]
        specs += [e.get("source_model") for e in _list(raw.get("experts")) if isinstance(e, dict)]
        slices = _list(raw.get("slices"))
        for sl in (s for s in slices if isinstance(s, dict) and isinstance(s.get("sources"), list)):
            specs += [src.get("model") for src in sl["sources"] if isinstance(src, dict)]
    return [parse_weighted(part)[0] for spec in specs if isinstance(spec, str) for part in spec.rsplit("+", 1)]


def _merge(args):
    from weightsmith import merge
    from weightsmith.errors import ConfigError

    common = dict(seed=args.seed, workers=args.workers, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    flags = {k[len(_DEST) :]: v for k, v in vars(args).items() if k.startswith(_DEST) and v is not None}
    if args.config:
        given = [f"--{k}" for k, v in {**flags, "method": args.method, "base": args.base}.items() if v is not None]
        given = [g.replace("_", "-") for g in given]
        if given or args.model:
            raise ConfigError(
                f"{args.config}: give either a config or the short-form flags, not both "
                f"({', '.join(given + ['--model'] * bool(args.model))})"
            )
        return merge.run(args.config, args.out, **common)
    if not args.method or not args.model:
        raise ConfigError("merge: give a config file, or --method and at least one --model")
    models: list = []
    for spec in args.model:
        path, sep, weight = spec.rpartition("@")
        if not sep:
            models.append(_revision(spec))
            continue
        try:
            models.append((_revision(path), float(weight)))
        except ValueError:
            raise ConfigError(
                f"--model {spec}: the weight after @ must be a number (a Hub revision is written ORG/NAME#REVISION)"
            ) from None
    base = _revision(args.base) if args.base else None
    return merge.quick(args.method, models, args.out, base=base, **common, **flags)


def _revision(spec: str) -> str:
    """The command line's ``ORG/NAME#REVISION`` as mergekit's ``ORG/NAME@REVISION`` (on the command line ``@``
    always introduces a weight); a path that exists is left as it is."""
    from pathlib import Path

    if "#" not in spec or Path(spec).exists():
        return spec
    repo, _, revision = spec.partition("#")
    return f"{repo}@{revision}"
