"""lora merge, lora unmerge, lora extract, lora combine, lora resize."""

from __future__ import annotations

import argparse

from weightsmith.cli.common import add_command, add_output_options, add_report_option, declare_inputs
from weightsmith.units import parse_weighted


def register(sub) -> None:
    examples = [
        "weightsmith lora merge ./llama ./adapter -o ./llama-merged",
        "weightsmith lora unmerge ./llama-merged ./adapter -o ./llama-base",
        "weightsmith lora extract ./llama ./llama-chat -o ./chat-adapter --rank 16",
        "weightsmith lora combine ./math@0.7 ./code@-0.4 -o ./both",
        "weightsmith lora resize ./adapter -o ./adapter-r8 --rank 8",
    ]
    group = sub.add_parser(
        "lora",
        help="fold PEFT adapters into a base, undo a fold, extract, combine or resize adapters",
        description="Fold PEFT adapters (LoRA, DoRA, AdaLoRA, IA³, LoHa, LoKr, VeRA, OFT, BOFT) into a base "
        "checkpoint, tensor by tensor (no model is built), undo such a fold, extract a LoRA adapter from a "
        "fine-tune, combine adapters into one, or change an adapter's rank.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
    )
    lora = group.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    _add_merge(lora)
    _add_unmerge(lora)
    _add_extract(lora)
    _add_combine(lora)
    _add_resize(lora)
    _add_routes(lora)


def _add_merge(lora) -> None:
    p = add_command(
        lora,
        "merge",
        help="fold one or more PEFT adapters into a base checkpoint",
        description="W' = W + Σ wᵢ·(fᵢ(W) − W) for each adapted tensor, fᵢ each adapter's own fold as PEFT's "
        "merge_and_unload computes it: LoRA (rsLoRA, DoRA, lora_bias, modules_to_save), AdaLoRA, VeRA, LoHa, LoKr "
        "(W + ΔW), IA³ (scaling) and OFT (rotation); Linear, Conv1D, embedding and conv; types may be mixed.",
        examples=[
            "weightsmith lora merge ./llama ./adapter -o ./llama-merged",
            "weightsmith lora merge ./llama ./math@0.7 ./code@0.3 -o ./merged --dtype bf16",
            "weightsmith lora merge ./gpt2 ./gpt2-adapter -o ./gpt2-merged --shard-size 500MB --json",
            "weightsmith lora merge ./llama-nf4 ./qlora-adapter -o ./merged-nf4 --requantize",
        ],
    )
    p.add_argument("base", help="base model directory or weight file (float, or NF4/int8: folded dequantized)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[@WEIGHT]", help="PEFT adapter directory, optional weight")
    p.add_argument(
        "--requantize", action="store_true", help="quantized base: write the fold in the base's own scheme again"
    )
    add_output_options(p, inputs=("base", "adapters"))
    p.set_defaults(handler=_merge)


def _add_unmerge(lora) -> None:
    p = add_command(
        lora,
        "unmerge",
        help="take a folded adapter back out of a merged checkpoint",
        description="W = W' − w·ΔW for additive adapters (LoRA, AdaLoRA, VeRA, LoHa, LoKr), W'/(1 + w·(l − 1)) "
        "for IA³ (refused where a factor is zero) and the inverse rotation for OFT; DoRA and adapters that "
        "replace whole tensors are refused.",
        examples=[
            "weightsmith lora unmerge ./llama-merged ./adapter -o ./llama-base",
            "weightsmith lora unmerge ./merged ./math@0.7 -o ./without-math",
        ],
    )
    p.add_argument("merged", help="checkpoint the adapter was folded into")
    p.add_argument("adapter", metavar="ADAPTER[@WEIGHT]", help="the PEFT adapter to take out")
    add_output_options(p, inputs=("merged", "adapter"))
    p.set_defaults(handler=_unmerge)


def _add_extract(lora) -> None:
    p = add_command(
        lora,
        "extract",
        help="extract a PEFT LoRA adapter from a fine-tune by truncated SVD",
        description="For every changed linear weight, ΔW ≈ B·A with B = U·√S, A = √S·Vᵀ; changed "
        "embeddings, norms and heads go to modules_to_save.",
        examples=[
            "weightsmith lora extract ./llama ./llama-chat -o ./chat-adapter --rank 16",
            "weightsmith lora extract ./bert ./bert-tuned -o ./bert-adapter --energy 0.9 --json",
        ],
    )
    p.add_argument("base", help="the model that was fine-tuned")
    p.add_argument("tuned", help="the fine-tuned model")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="rank of every extracted module")
    how.add_argument("--energy", type=float, help="keep this fraction of each ΔW's squared singular values (0–1]")
    add_output_options(p, inputs=("base", "tuned"), dtype=False, shards=False)
    p.set_defaults(handler=_extract)


def _add_combine(lora) -> None:
    p = add_command(
        lora,
        "combine",
        help="combine LoRA adapters into one adapter",
        description="cat: ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ exactly (rank Σ rᵢ); svd: that sum re-compressed to --rank or "
        "--energy; ties/dare: TIES or DARE-TIES on the ΔWᵢ, then SVD. The result loads with "
        "PeftModel.from_pretrained.",
        examples=[
            "weightsmith lora combine ./math@0.7 ./code@-0.4 -o ./both",
            "weightsmith lora combine ./math ./code -o ./math-code-r16 --method svd --rank 16 --json",
            "weightsmith lora combine ./math ./code ./chat -o ./three --method ties --density 0.3 --energy 0.95",
        ],
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[@WEIGHT]", help="PEFT LoRA adapter directory, weight")
    p.add_argument("--method", choices=["cat", "svd", "ties", "dare"], default="cat", help="default: cat (exact)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, help="rank of every module after the SVD (svd, ties, dare)")
    how.add_argument("--energy", type=float, help="keep this fraction of each ΔW's squared singular values")
    p.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of each ΔWᵢ kept (default 0.5)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="ties/dare: scale of the result")
    p.add_argument("--seed", type=int, default=0, help="dare: random seed")
    add_output_options(p, inputs=("adapters",), dtype=False, shards=False)
    p.set_defaults(handler=_combine)


def _add_resize(lora) -> None:
    p = add_command(
        lora,
        "resize",
        help="change a LoRA adapter's rank by SVD of each module's ΔW",
        description="Each module's ΔW = s·B·A truncated to --rank, to the smallest rank keeping --energy, or to "
        "the singular values above --threshold; the energy kept is reported per module.",
        examples=[
            "weightsmith lora resize ./adapter -o ./adapter-r8 --rank 8",
            "weightsmith lora resize ./adapter -o ./adapter-auto --threshold 1e-3 --json",
        ],
    )
    p.add_argument("adapter", help="PEFT LoRA adapter directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="rank of every module (never above its own)")
    how.add_argument("--energy", type=float, help="keep this fraction of each ΔW's squared singular values (0–1]")
    how.add_argument("--threshold", type=float, help="keep the singular values above this (mergekit's --sv-epsilon)")
    add_output_options(p, inputs=("adapter",), dtype=False, shards=False)
    p.set_defaults(handler=_resize)


def _add_routes(lora) -> None:
    p = add_command(
        lora,
        "routes",
        help="measure the ways to fold a QLoRA adapter: float base, dequantized, re-quantized",
        description="Per adapted weight, the error of each route against the model the adapter was trained with "
        "(dequantized base + ΔW), relative to ‖ΔW‖. Nothing is written.",
        examples=[
            "weightsmith lora routes ./llama-nf4 ./qlora-adapter --float-base ./llama",
            "weightsmith lora routes ./llama-int8 ./adapter --json",
        ],
    )
    p.add_argument("quantized_base", help="the NF4 or int8 base the adapter was trained on")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[@WEIGHT]", help="PEFT adapter directory, optional weight")
    p.add_argument("--float-base", help="the float model the quantized base was made from")
    p.add_argument("--dtype", help="dtype the dequantized route would be written in (default: the recorded one)")
    add_report_option(p)
    declare_inputs(p, "quantized_base", "adapters", "float_base")
    p.set_defaults(handler=_routes)


def _merge(args):
    from weightsmith.merge.lora import merge

    return merge(
        args.base,
        [parse_weighted(a) for a in args.adapters],
        args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
        requantize=args.requantize,
    )


def _unmerge(args):
    from weightsmith.merge.lora import unmerge

    return unmerge(
        args.merged,
        parse_weighted(args.adapter),
        args.out,
        dtype=args.dtype,
        shard_size=args.shard_size,
        force=args.force,
    )


def _extract(args):
    from weightsmith.merge.lora import extract

    return extract(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy, force=args.force)


def _combine(args):
    from weightsmith.merge.lora import combine

    return combine(
        [parse_weighted(a) for a in args.adapters],
        args.out,
        method=args.method,
        rank=args.rank,
        energy=args.energy,
        density=args.density,
        lam=args.lam,
        seed=args.seed,
        force=args.force,
    )


def _resize(args):
    from weightsmith.merge.lora import resize

    return resize(
        args.adapter, args.out, rank=args.rank, energy=args.energy, threshold=args.threshold, force=args.force
    )


def _routes(args):
    from weightsmith.merge.lora import routes

    return routes(
        args.quantized_base, [parse_weighted(a) for a in args.adapters], float_base=args.float_base, dtype=args.dtype
    )
