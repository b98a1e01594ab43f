"""weightsmith convert: reshard, recast, or turn .bin into safetensors."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_output_options


def register(sub) -> None:
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


def _convert(args):
    from weightsmith.conversion import convert

    return convert(args.src, args.out, dtype=args.dtype, shard_size=args.shard_size, force=args.force)
