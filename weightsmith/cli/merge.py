"""merge: a mergekit-style YAML, or the short form with flags."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_output_options, parse_adapter, yaml_mapping

_METHODS = (
    "linear",
    "slerp",
    "nuslerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "passthrough",
)


def register(sub) -> None:
    p = add_command(
        sub,
        "merge",
        help="merge fine-tunes of one base (mergekit YAML or flags), streamed tensor by tensor",
        description="Merge models with linear, SLERP, task arithmetic, TIES, DARE, breadcrumbs, DELLA, Model Stock, "
        "NuSLERP or passthrough. Give a mergekit YAML config, or the method and models as flags. "
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
    p.add_argument("--method", choices=_METHODS, help="merge method (short form)")
    p.add_argument("--base", help="base model (short form)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH[@WEIGHT]",
        help="a model to merge, optionally with its weight (repeat; short form)",
    )
    p.add_argument("--density", type=float, help="fraction of each task vector kept (ties, dare, della, breadcrumbs)")
    p.add_argument("--lambda", dest="lam", type=float, help="scale of the merged task vector (default 1)")
    p.add_argument("--t", type=float, help="interpolation position for slerp (0 gives the base)")
    p.add_argument("--epsilon", type=float, help="della: spread of keep probabilities (default 0.15)")
    p.add_argument("--gamma", type=float, help="breadcrumbs: fraction of largest entries dropped (default 0.01)")
    p.add_argument("--normalize", action="store_true", default=None, help="divide by the sum of weights")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="do not normalise the weights")
    p.add_argument(
        "--rescale-mode",
        choices=("1/p", "l1"),
        help="dare/della survivors: 1/p (the papers, default) or l1 (mergekit's norm matching)",
    )
    p.add_argument("--consensus", choices=("sum", "count"), help="ties sign election (default sum)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods (default 0)")
    p.add_argument("--workers", type=int, default=1, help="tensors merged at once (output does not depend on it)")
    add_output_options(p)
    p.set_defaults(handler=_merge, inputs=_inputs)


def _inputs(args) -> list[str]:
    """The checkpoints a merge reads (for hashing ahead); a config that cannot be read yields none of its own."""
    specs = [args.base, *args.model]
    if args.config:
        raw = yaml_mapping(args.config)
        models = raw.get("models") if isinstance(raw.get("models"), list) else []
        specs += [raw.get("base_model")] + [m.get("model") for m in models if isinstance(m, dict)]
    return [parse_adapter(part)[0] for spec in specs if isinstance(spec, str) for part in spec.rsplit("+", 1)]


def _merge(args):
    from weightsmith import merge
    from weightsmith.errors import ConfigError

    common = dict(seed=args.seed, workers=args.workers, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
    flags = dict(
        density=args.density,
        lam=args.lam,
        t=args.t,
        epsilon=args.epsilon,
        gamma=args.gamma,
        normalize=args.normalize,
        rescale_mode=args.rescale_mode,
        consensus=args.consensus,
    )
    if args.config:
        given = [f"--{k}" for k, v in {**flags, "method": args.method, "base": args.base}.items() if v is not None]
        if given or args.model:
            raise ConfigError(
                f"{args.config}: give either a config or the short-form flags, not both "
                f"({', '.join(given + ['--model'] * bool(args.model))})"
            )
        return merge.run(args.config, args.out, **common)
    if not args.method or not args.model:
        raise ConfigError("merge: give a config file, or --method and at least one --model")
    models = []
    for spec in args.model:
        path, sep, weight = spec.rpartition("@")
        if not sep:
            models.append(spec)
            continue
        try:
            models.append((path, float(weight)))
        except ValueError:
            raise ConfigError(f"--model {spec}: the weight after @ must be a number") from None
    return merge.quick(args.method, models, args.out, base=args.base, **common, **flags)
