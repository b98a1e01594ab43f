"""lora merge, lora unmerge, lora extract."""

from __future__ import annotations

import argparse

from weightsmith.cli.common import add_command, add_output_options, parse_adapter


def register(sub) -> None:
    examples = [
        "weightsmith lora merge ./llama ./adapter -o ./llama-merged",
        "weightsmith lora unmerge ./llama-merged ./adapter -o ./llama-base",
        "weightsmith lora extract ./llama ./llama-chat -o ./chat-adapter --rank 16",
    ]
    group = sub.add_parser(
        "lora",
        help="fold PEFT LoRA adapters into a base, undo a fold, or extract an adapter",
        description="Fold PEFT LoRA adapters into a base checkpoint, tensor by tensor (no model "
        "is built), undo such a fold, or extract a LoRA adapter from a fine-tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
    )
    lora = group.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)

    p = add_command(
        lora,
        "merge",
        help="fold one or more LoRA adapters into a base checkpoint",
        description="W' = W + Σ wᵢ·ΔWᵢ for each adapted tensor, matching PEFT's merge_and_unload "
        "(LoRA, rsLoRA, DoRA, Conv1D, embedding, conv, lora_bias, modules_to_save).",
        examples=[
            "weightsmith lora merge ./llama ./adapter -o ./llama-merged",
            "weightsmith lora merge ./llama ./math@0.7 ./code@0.3 -o ./merged --dtype bf16",
            "weightsmith lora merge ./gpt2 ./gpt2-adapter -o ./gpt2-merged --shard-size 500MB --json",
        ],
    )
    p.add_argument("base", help="base model directory or weight file")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[@WEIGHT]", help="PEFT adapter directory, optional weight")
    add_output_options(p, inputs=("base", "adapters"))
    p.set_defaults(handler=_merge)

    p = add_command(
        lora,
        "unmerge",
        help="subtract a plain LoRA adapter from a merged checkpoint",
        description="W = W' − w·s·B·A: the exact inverse of a plain-LoRA fold (DoRA is refused).",
        examples=[
            "weightsmith lora unmerge ./llama-merged ./adapter -o ./llama-base",
            "weightsmith lora unmerge ./merged ./math@0.7 -o ./without-math",
        ],
    )
    p.add_argument("merged", help="checkpoint the adapter was folded into")
    p.add_argument("adapter", metavar="ADAPTER[@WEIGHT]", help="the PEFT adapter to take out")
    add_output_options(p, inputs=("merged", "adapter"))
    p.set_defaults(handler=_unmerge)

    p = add_command(
        lora,
        "extract",
        help="extract a PEFT LoRA adapter from a fine-tune by truncated SVD",
        description="For every changed linear weight, ΔW ≈ B·A with B = U·√S, A = √S·Vᵀ; changed "
        "embeddings, norms and heads go to modules_to_save.",
        examples=[
            "weightsmith lora extract ./llama ./llama-chat -o ./chat-adapter --rank 16",
            "weightsmith lora extract ./bert ./bert-tuned -o ./adapter --energy 0.9 --json",
        ],
    )
    p.add_argument("base", help="the model that was fine-tuned")
    p.add_argument("tuned", help="the fine-tuned model")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="rank of every extracted module")
    how.add_argument("--energy", type=float, help="keep this fraction of each ΔW's squared singular values (0–1]")
    add_output_options(p, inputs=("base", "tuned"), dtype=False, shards=False)
    p.set_defaults(handler=_extract)


def _merge(args):
    from weightsmith.merge.lora import merge

    return merge(
        args.base,
        [parse_adapter(a) for a in args.adapters],
        args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
    )


def _unmerge(args):
    from weightsmith.merge.lora import unmerge

    return unmerge(
        args.merged,
        parse_adapter(args.adapter),
        args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
    )


def _extract(args):
    from weightsmith.merge.lora import extract

    return extract(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy, force=args.force)
