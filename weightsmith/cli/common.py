"""Options shared by the subcommands, so every verb spells them the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from weightsmith.units import parse_weighted

# glibc's mmap threshold for the verbs that write checkpoints (see ``weightsmith.cli._return_freed_tensors``)
MMAP_THRESHOLD = 4 * 1024 * 1024
SMALL_MMAP_THRESHOLD = 128 * 1024  # GPTQ's (cli/quantize.py sets it): its peak is what its peers are held to


def add_command(sub, name: str, *, help: str, examples: list[str], description: str | None = None):
    """A subparser with --json/--debug and an examples epilog (the examples are parsed in the tests)."""
    parser = sub.add_parser(
        name,
        help=help,
        description=description or help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    return parser


def add_output_options(
    parser: argparse.ArgumentParser, *, inputs: tuple[str, ...] = ("src",), dtype: bool = True, shards: bool = True
) -> None:
    """-o/--force (and --dtype, --shard-size); ``inputs`` names the arguments holding the checkpoints the command
    reads, which the CLI starts hashing for the output's provenance before torch is imported."""
    declare_inputs(parser, *inputs)
    parser.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    add_report_option(parser)
    if dtype:
        parser.add_argument("--dtype", help="cast float tensors when writing: float32, bfloat16, float16")
    if shards:
        parser.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 500MB, 2GiB (default 5GB)")


def add_report_option(parser: argparse.ArgumentParser) -> None:
    """--report PATH.html: the report drawn as one self-contained HTML page (and --force to replace one, where the
    command has no --force of its own)."""
    parser.add_argument(
        "--report", metavar="PATH.html", help="also write the report as a self-contained HTML page with charts"
    )
    if "--force" not in parser._option_string_actions:
        parser.add_argument("--force", action="store_true", help="replace an existing --report file")


def declare_inputs(parser: argparse.ArgumentParser, *dests: str) -> None:
    """Record which arguments (``dest`` names; values may be lists and carry ``@WEIGHT``) are input checkpoints."""

    def inputs(args: argparse.Namespace) -> list[str]:
        values = [getattr(args, d, None) for d in dests]
        return [
            parse_weighted(v)[0]
            for value in values
            for v in (value if isinstance(value, list) else [value])
            if isinstance(v, str)
        ]

    parser.set_defaults(inputs=inputs)


def yaml_mapping(path: str) -> dict:
    """The top-level mapping of a YAML file, or {} when it cannot be read (the command itself reports why)."""
    from weightsmith.errors import ConfigError
    from weightsmith.yamltext import parse_mapping

    try:
        return parse_mapping(Path(path).read_text(encoding="utf-8"), path, "a mapping")
    except (OSError, UnicodeDecodeError, ConfigError):
        return {}
