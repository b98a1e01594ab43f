"""prune: unstructured, N:M and structured pruning."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_output_options


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
    p.add_argument(
        "--method",
        choices=["magnitude", "wanda"],
        default="magnitude",
        help="score: |W| (magnitude, data-free) or |W|·‖X‖ per output row (wanda, needs --calibration)",
    )
    p.add_argument("--sparsity", type=float, help="fraction of weights set to zero, in [0, 1)")
    p.add_argument(
        "--scope",
        choices=["layer", "global"],
        default="layer",
        help="magnitude: the sparsity per tensor (layer) or over all pruned tensors (global)",
    )
    p.add_argument("--pattern", help="N:M semi-structured sparsity along the input dimension, e.g. 2:4")
    p.add_argument("--calibration", help="text file (one sample per line) for wanda or activation-scored structured")
    p.add_argument("--samples", type=int, default=64, help="calibration lines used (default 64)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration line at most (default 128)")
    p.add_argument("--structured", choices=["ffn", "heads"], help="remove FFN neurons or attention heads")
    p.add_argument("--ratio", type=float, help="structured: fraction of neurons / heads removed per block")
    p.add_argument("--keep-heads", type=int, help="structured heads: query heads kept per block")
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

    return prune(
        args.src,
        args.out,
        method=args.method,
        sparsity=args.sparsity,
        scope=args.scope,
        pattern=args.pattern,
        calibration=args.calibration,
        samples=args.samples,
        seq_len=args.seq_len,
        structured=args.structured,
        ratio=args.ratio,
        keep_heads=args.keep_heads,
        skip=args.skip,
        default_skip=not args.no_default_skip,
        eval_data=args.eval_data,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
    )
