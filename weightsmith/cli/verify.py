"""weightsmith verify: check an output against the digests recorded when it was written."""

from __future__ import annotations

from weightsmith.cli.common import add_command, add_report_option


def register(sub) -> None:
    p = add_command(
        sub,
        "verify",
        help="check a weightsmith output against the digests recorded when it was written",
        examples=["weightsmith verify ./merged", "weightsmith verify ./llama-bf16 --json"],
    )
    p.add_argument("path", help="an output directory written by weightsmith")
    add_report_option(p)
    p.set_defaults(handler=_verify)


def _verify(args):
    from weightsmith.verification import verify

    return verify(args.path)
