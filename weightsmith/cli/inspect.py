"""weightsmith inspect: describe a checkpoint or adapter without loading it."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_report_option


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


def _inspect(args):
    from weightsmith.inspection import inspect

    return inspect(args.path, tensors=args.tensors, stats=args.stats)
