"""prune: unstructured, N:M and structured pruning."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_output_options
from weightsmith.compress.prune.methods import keyword_options


def register(sub) -> None:
    p = add_command(
        sub,
        "prune",
        help="prune weights (magnitude, Wanda, N:M) or remove FFN neurons / attention heads",
        description="Unstructured pruning writes dense zeros; structured pruning writes a smaller model with a "
        "rewritten config.json. Embeddings, norms and output heads stay dense unless --no-default-skip.",
        examples=[
            "weightsmith prune ./llama -o ./llama-50 --method magnitude --sparsity 0.5",
            "weightsmith prune ./llama -o ./llama-50g --sparsity 0.5 --scope global",
            "weightsmith prune ./minilm -o ./minilm-wanda --method wanda --sparsity 0.5 --calibration c.txt",
            "weightsmith prune ./llama -o ./llama-24 --pattern 2:4",
            "weightsmith prune ./llama -o ./llama-ffn --structured ffn --ratio 0.25 --eval-data held.txt",
            "weightsmith prune ./llama -o ./llama-heads --structured heads --keep-heads 16",
        ],
    )
    p.add_argument("src", help="model directory or weight file")
    # One flag per keyword of the library's keyword form: the method selectors and the configs' fields.
    for name, spec in keyword_options().items():
        p.add_argument("--" + name.replace("_", "-"), type=spec["type"], choices=spec.get("choices"), help=spec["help"])
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave matching tensors dense (repeatable; added to the defaults)",
    )
    p.add_argument(
        "--no-default-skip",
        action="store_true",
        help="also prune embeddings, norms and output heads (2-D weights only)",
    )
    p.add_argument("--eval-data", help="text file: perplexity (causal LM) or embedding cosine (encoder) before/after")
    add_output_options(p)
    p.set_defaults(handler=_prune)


def _prune(args):
    from weightsmith.compress.prune import prune

    keywords = {name: getattr(args, name) for name in keyword_options()}
    return prune(
        args.src,
        args.out,
        skip=args.skip,
        default_skip=not args.no_default_skip,
        eval_data=args.eval_data,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
        **keywords,
    )
