"""run (recipes) and eval."""

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

    p = add_command(
        sub,
        "eval",
        help="perplexity, embedding cosine, image accuracy, seq2seq agreement, logits |Δ| and KL",
        examples=[
            "weightsmith eval ./llama-pruned --data held_out.txt",
            "weightsmith eval ./minilm-int8 --ref ./minilm --data sentences.txt --json",
            "weightsmith eval ./onnx/model.onnx --ref ./minilm --data sentences.txt",
            "weightsmith eval ./minilm-int8 --ref ./minilm --data sentences.txt --report eval.html",
        ],
    )
    p.add_argument("model", help="model directory or .onnx file")
    p.add_argument(
        "--data",
        required=True,
        help="text file, one sample per line; for an image classifier a class_name/*.png folder; for a seq2seq "
        "model source texts (.jsonl: 'text', optional 'target')",
    )
    p.add_argument("--ref", help="reference checkpoint to compare against")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample (default 128)")
    add_report_option(p)
    p.set_defaults(handler=_eval)


def _inputs(args) -> list[str]:
    """The recipe's input checkpoint (for hashing ahead); none for a dry run or a recipe that cannot be read."""
    source = None if args.dry_run else yaml_mapping(args.recipe).get("input")
    return [source] if isinstance(source, str) else []


def _run(args):
    from weightsmith.recipe import run

    return run(args.recipe, dry_run=args.dry_run, force=args.force)


def _eval(args):
    from weightsmith.evaluation import evaluate

    return evaluate(args.model, args.data, ref=args.ref, max_length=args.max_length)
