"""inspect, diff, convert, verify."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_output_options, add_report_option


def register(sub) -> None:
    p = add_command(
        sub,
        "inspect",
        help="describe a checkpoint or adapter without loading it",
        examples=[
            "weightsmith inspect ./llama-7b",
            "weightsmith inspect ./adapter --json",
            "weightsmith inspect model.safetensors --tensors --stats",
            "weightsmith inspect ./llama-7b --report llama.html",
        ],
    )
    p.add_argument("path", help="model directory, .safetensors/.bin file, or PEFT adapter directory")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--stats", action="store_true", help="read every tensor: min/max/mean/std/zeros/NaN/Inf")
    add_report_option(p)
    p.set_defaults(handler=_inspect)

    p = add_command(
        sub,
        "diff",
        help="compare two checkpoints tensor by tensor",
        examples=[
            "weightsmith diff ./base ./merged",
            "weightsmith diff a.safetensors b.safetensors --json",
            "weightsmith diff ./base ./merged --report diff.html",
        ],
    )
    p.add_argument("a")
    p.add_argument("b")
    add_report_option(p)
    p.set_defaults(handler=_diff)

    p = add_command(
        sub,
        "convert",
        help="reshard, recast, or turn .bin into safetensors",
        examples=[
            "weightsmith convert ./gpt2-bin -o ./gpt2-st",
            "weightsmith convert ./llama -o ./llama-bf16 --dtype bf16 --shard-size 2GiB",
        ],
    )
    p.add_argument("src")
    add_output_options(p)
    p.set_defaults(handler=_convert)

    p = add_command(
        sub,
        "verify",
        help="check a weightsmith output against the digests recorded when it was written",
        examples=["weightsmith verify ./merged", "weightsmith verify ./llama-bf16 --json"],
    )
    p.add_argument("path", help="an output directory written by weightsmith")
    add_report_option(p)
    p.set_defaults(handler=_verify)


def _inspect(args):
    from weightsmith.inspection import inspect

    return inspect(args.path, tensors=args.tensors, stats=args.stats)


def _diff(args):
    from weightsmith.inspection import diff

    return diff(args.a, args.b)


def _convert(args):
    from weightsmith.conversion import convert

    return convert(args.src, args.out, dtype=args.dtype, shard_size=args.shard_size, force=args.force)


def _verify(args):
    from weightsmith.verification import verify

    return verify(args.path)
