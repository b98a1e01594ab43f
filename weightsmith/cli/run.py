"""weightsmith run: a recipe of steps, streamed where it can be."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_report_option, yaml_mapping


def register(sub) -> None:
    p = add_command(
        sub,
        "run",
        help="run a recipe: a YAML list of steps, streamed where it can be",
        examples=[
            "weightsmith run recipe.yaml",
            "weightsmith run recipe.yaml --dry-run",
            "weightsmith run recipe.yaml --json --force",
        ],
        description="Run a recipe (steps: lora_merge, merge, prune, quantize, distill, export, convert; "
        "each takes its command's parameters; '@previous' in a merge names the step before).",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan; write nothing")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    add_report_option(p)
    p.set_defaults(handler=_run, inputs=_inputs)


def _inputs(args) -> list[str]:
    """The recipe's input checkpoint (for hashing ahead); none for a dry run or a recipe that cannot be read."""
    source = None if args.dry_run else yaml_mapping(args.recipe).get("input")
    return [source] if isinstance(source, str) else []


def _run(args):
    from weightsmith.recipe import run

    return run(args.recipe, dry_run=args.dry_run, force=args.force)
