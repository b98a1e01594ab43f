"""The ``weightsmith`` command: a thin skin over the library, one subcommand per verb.

Each module in ``COMMAND_MODULES`` registers its subcommands; a handler calls exactly one library function and
returns its Report. Nothing here imports torch: ``weightsmith --help`` starts instantly.
Exit codes: 0 success, 2 bad input (one line on stderr), 3 the machine refused a write (disk full, read-only or
forbidden folder, file-size limit; one line), 1 a bug (traceback with --debug), 130 interrupted.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib
import os
import re
import sys
import traceback
from pathlib import Path

from weightsmith import __version__
from weightsmith.cli.common import MMAP_THRESHOLD

COMMAND_MODULES = [
    "weightsmith.cli.inspect",
    "weightsmith.cli.diff",
    "weightsmith.cli.convert",
    "weightsmith.cli.verify",
    "weightsmith.cli.lora",
    "weightsmith.cli.merge",
    "weightsmith.cli.quantize",
    "weightsmith.cli.prune",
    "weightsmith.cli.distill",
    "weightsmith.cli.export",
    "weightsmith.cli.run",
    "weightsmith.cli.eval",
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


def flag_spellings(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Parameter name → the long flag that sets it, over every subcommand (a parameter has one flag everywhere)."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                for dest, flag in flag_spellings(subparser).items():
                    flags.setdefault(dest, flag)
        elif action.option_strings and action.option_strings[-1].startswith("--"):
            flags.setdefault(action.dest, action.option_strings[-1])
    return flags


def spell_flags(message: str, flags: dict[str, str]) -> str:
    """A library message with each backticked parameter that is a flag written as the flag (`force` → --force)."""
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def program() -> int:
    """The ``weightsmith`` command (its console script and ``python -m weightsmith.cli``): ``main`` on the process's
    arguments. Then every object left is frozen out of the garbage collector: the interpreter's exit otherwise scans
    all of torch's once more, about 0.2 s of every command (a 2.5 s LoRA fold spent 0.27 s after its work was done,
    0.10 s frozen). Only the exiting program does this; ``main`` is for callers that go on running."""
    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning: the streamed work runs many short parallel ops beside the I/O
    # thread and the digest helper, and a spinning thread takes their core (on two cores a LoRA fold ran 1.5-1.7×
    # slower, and merges 10-20× slower on a machine busy with other work). Set before torch is imported; the user's
    # own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if callable(getattr(args, "inputs", None)):  # a command that writes a checkpoint from the ones it names
        _start_input_digests(args)
        threshold = getattr(args, "mmap_threshold", MMAP_THRESHOLD)
        _return_freed_tensors(threshold(args) if callable(threshold) else threshold)
    _plain_warnings()
    code = _run(args, parser)
    if code != 0 and getattr(args, "out", None):
        _remove_own_leftovers(Path(args.out))
    return code


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from weightsmith.errors import EXIT_BAD_INPUT, EXIT_STORAGE, StorageError, WeightsmithError

    try:
        report = _call(args)
    except StorageError as exc:
        print(f"weightsmith: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_STORAGE
    except WeightsmithError as exc:
        print(f"weightsmith: error: {one_line(spell_flags(str(exc), flag_spellings(parser)))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("weightsmith: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:  # a write outside the checkpoint writer (ONNX export…) that the machine refused
        from weightsmith.checkpoint.staging import storage_error

        err = storage_error(exc, Path(getattr(args, "out", None) or "output"))
        if err is None:
            return _internal_error(args, exc)
        print(f"weightsmith: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_STORAGE
    except Exception as exc:  # a bug: say so plainly, full traceback on request
        return _internal_error(args, exc)
    if report is not None:
        print(report.to_json() if getattr(args, "json", False) else report.to_text())
    return 0


def one_line(message: str) -> str:
    """A message as one printable line: names taken from hostile files may hold newlines or control characters."""
    if message.isprintable():
        return message
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def _remove_own_leftovers(out: Path) -> None:
    """What this process left beside ``out`` (a Ctrl-C between creating a temporary folder and guarding it)."""
    import shutil

    from weightsmith.checkpoint.staging import DestinationLock, leftovers

    for path, pid in leftovers(out):
        if pid == os.getpid():
            shutil.rmtree(path, ignore_errors=True)
    lock = DestinationLock(out).path
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass


def _internal_error(args: argparse.Namespace, exc: BaseException) -> int:
    if getattr(args, "debug", False):
        traceback.print_exc()
    else:
        print(
            f"weightsmith: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
    return 1


def _plain_warnings() -> None:
    """weightsmith's own warnings (a leftover folder it did not remove) as one line, without a source location."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "weightsmith", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("weightsmith"):
            print(f"weightsmith: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.weightsmith = True  # type: ignore[attr-defined]
    warnings.showwarning = show


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


def _return_freed_tensors(threshold: int) -> None:
    """Give every tensor-sized buffer back to the system when it is freed. glibc raises its mmap threshold after each
    large free (up to 32 MiB), so later tensors come from the heap, where fragmentation keeps them: the resident set
    grew by about a tensor per write (a LoRA fold into a 2.2 GB base peaked at 0.9-1.2 GB, varying run to run). A
    fixed ``MMAP_THRESHOLD`` of 4 MiB keeps each tensor buffer above it its own mapping, unmapped when freed, while
    the megabyte-sized blocks that folds and merges work in are reused from the heap instead of page-faulted in
    afresh each time: the fold peaks at 290-310 MB; a task-arithmetic merge of three 627 MB models takes 6.4 s (8.8 s
    at 128 KiB, where every block was a new mapping) at 630 MB; the data-free quantize schemes work in 1 MiB slices
    for the same reason. GPTQ keeps ``SMALL_MMAP_THRESHOLD`` (128 KiB): its activations and solves fragment the heap
    (a 0.4 GB model peaked at 803 MB with 4 MiB, 659 MB with 128 KiB, in about the same time). A no-op where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD, fixed: the threshold no longer rises after a large free
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
