"""The ``weightsmith`` command: a thin skin over the library, one subcommand per verb.

Each module in ``COMMAND_MODULES`` registers its subcommands; a handler calls exactly one library function and
returns its Report. Nothing here imports torch: ``weightsmith --help`` starts instantly.
Exit codes: 0 success, 2 bad input (one line on stderr), 1 a bug (traceback with --debug), 130 interrupted.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib
import os
import sys
import traceback

from weightsmith import __version__

COMMAND_MODULES = [
    "weightsmith.cli.core",
    "weightsmith.cli.lora",
    "weightsmith.cli.merge",
    "weightsmith.cli.quantize",
    "weightsmith.cli.prune",
    "weightsmith.cli.distill",
    "weightsmith.cli.export",
    "weightsmith.cli.run",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Streaming checkpoint surgery: fold LoRA, merge, quantize, prune, distill, export.",
        epilog="Run 'weightsmith COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning: the streamed work runs many short parallel ops beside the I/O
    # thread and the digest helper, and a spinning thread takes their core (on two cores a LoRA fold ran 1.5-1.7×
    # slower, and merges 10-20× slower on a machine busy with other work). Set before torch is imported; the user's
    # own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if callable(getattr(args, "inputs", None)):  # a command that writes a checkpoint from the ones it names
        _start_input_digests(args)
        _reuse_freed_memory()
    from weightsmith.errors import WeightsmithError

    try:
        report = _call(args)
    except WeightsmithError as exc:
        print(f"weightsmith: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weightsmith: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, full traceback on request
        if getattr(args, "debug", False):
            traceback.print_exc()
        else:
            print(
                f"weightsmith: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1
    if report is not None:
        print(report.to_json() if getattr(args, "json", False) else report.to_text())
    return 0


def _call(args: argparse.Namespace):
    """The command's one library call; with --report, inside ``collecting_figures`` and drawn as HTML after (the
    report's path is checked before any work)."""
    path = getattr(args, "report", None)
    if not path:
        return args.handler(args)
    from weightsmith.report import collecting_figures
    from weightsmith.report_html import check_report_path, write_html

    force = bool(getattr(args, "force", False))
    check_report_path(path, force)
    with collecting_figures():
        report = args.handler(args)
    if report is not None:
        write_html(report, path, force=force)
    return report


def _start_input_digests(args: argparse.Namespace) -> None:
    """Hash the checkpoints the command reads (its ``inputs``) for the output's provenance while torch is still
    being imported."""
    from weightsmith.digests import prefetch

    prefetch(args.inputs(args))


def _reuse_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of unmapping every large block: a streamed pass allocates
    and frees tensors of the same few sizes thousands of times, and by default each one is a fresh mmap that
    page-faults its way in (420k faults, a tenth of the time, folding a LoRA into a 1 GB base). Peak RSS stays that
    of the largest working set. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for the next tensor
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
