"""weightsmith diff: compare two checkpoints tensor by tensor."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_report_option


def register(sub) -> None:
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


def _diff(args):
    from weightsmith.inspection import diff

    return diff(args.a, args.b)
