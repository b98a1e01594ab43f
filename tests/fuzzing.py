"""The fuzzing harness: run one hostile input through the real command line (in-process) and classify the outcome.

Every input an outside file can bring is fed to the command that reads it (``convert``, ``inspect``, ``lora merge``,
``quantize``, ``merge``, ``run --dry-run``). An outcome is one of:

- accepted: exit 0, and an output written by it verifies against its manifest;
- refused: exit 2, exactly one line ``weightsmith: error: …``, nothing at the destination, no leftovers;

and anything else is a failure, counted by kind: a traceback (exit 1, or an exception escaping ``main``), a partial
output, a hang (over ``HANG_SECONDS``), or code executed (the payloads of hostile pickles create ``MARKER``).
The counts accumulate in ``TALLY``; ``make fuzz`` prints them (tests/conftest.py). An input that fails is saved under
``tests/fuzz_corpus/<target>/`` when ``WEIGHTSMITH_FUZZ_SAVE=1``, so every later run replays it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

CORPUS = Path(__file__).parent / "fuzz_corpus"
MARKER = Path(tempfile.gettempdir()) / f"weightsmith-fuzz-code-ran-{os.getpid()}"
HANG_SECONDS = 30
TALLY: Counter = Counter()
TARGETS: dict[str, Counter] = {}  # per target: inputs tried and seconds spent in the command
KINDS = ("tried", "accepted", "refused", "tracebacks", "partial_outputs", "hangs", "code_executed")


class Hang(BaseException):
    """Raised in the main thread when one input takes longer than HANG_SECONDS."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def cli(argv: list[str]) -> tuple[int, str]:
    """``weightsmith ARGV`` in this process, without the digest helper process; (exit code, stderr)."""
    import weightsmith.cli as cli_module

    err, out = io.StringIO(), io.StringIO()
    # Start-up work that does not depend on the input would dominate: the digest helper process, the allocator
    # tuning (which runs ldconfig) and building the parser (reused: parse_args leaves it unchanged).
    saved = cli_module._start_input_digests, cli_module._return_freed_tensors, cli_module.build_parser
    cli_module._start_input_digests = lambda args: None
    cli_module._return_freed_tensors = lambda threshold: None
    parser = _parser(saved[2])
    cli_module.build_parser = lambda: parser
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli_module.main([str(a) for a in argv])
    finally:
        cli_module._start_input_digests, cli_module._return_freed_tensors, cli_module.build_parser = saved
    return code, err.getvalue()


@functools.cache
def _parser(build):
    return build()


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.weightsmith-")]


def budget(weight: int):
    """The Hypothesis settings of a fuzz target: the profile's ``max_examples`` times ``weight`` (cheap parsers get
    more inputs than targets whose every input builds a model)."""
    from hypothesis import settings

    return settings(max_examples=max(1, weight * settings.default.max_examples))


def exercise(target: str, data: bytes, argv: list[str], out: Path | None = None) -> str:
    """Run ``weightsmith ARGV`` on an input (``data``, for the corpus) and classify it; raise on any failure."""
    MARKER.unlink(missing_ok=True)
    TALLY["tried"] += 1
    mine = TARGETS.setdefault(target, Counter())
    mine["tried"] += 1
    problems: list[str] = []
    code, err = -1, ""
    started = time.perf_counter()
    try:
        with time_limit(HANG_SECONDS):
            code, err = cli(argv)
    except Hang as exc:
        TALLY["hangs"] += 1
        problems.append(f"hang: {exc}")
    except Exception as exc:  # escaped main(): as bad as a traceback
        TALLY["tracebacks"] += 1
        problems.append(f"exception escaped the CLI: {type(exc).__name__}: {exc}")
    mine["seconds"] += time.perf_counter() - started
    if MARKER.exists():
        TALLY["code_executed"] += 1
        problems.append("the input ran code (the payload's marker file exists)")
    lines = err.strip().splitlines()
    if code == 0:
        if out is not None and out.exists():
            from weightsmith.verification import verify

            verify(out)
        TALLY["accepted"] += 1
    elif code == 2:
        if len(lines) != 1 or not lines[0].startswith("weightsmith: error: "):
            problems.append(f"refusal is not one line: {err!r}")
        else:
            TALLY["refused"] += 1
    elif code != -1:
        TALLY["tracebacks"] += 1
        problems.append(f"exit {code}: {err.strip()[-500:]}")
    if out is not None and code != 0 and (out.exists() or leftovers(out)):
        TALLY["partial_outputs"] += 1
        problems.append(f"partial output left: {sorted(p.name for p in [out, *leftovers(out)] if p.exists())}")
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    if problems:
        _save(target, data)
        raise AssertionError(f"{target}: {'; '.join(problems)}")
    return "accepted" if code == 0 else "refused"


def _save(target: str, data: bytes) -> None:
    if os.environ.get("WEIGHTSMITH_FUZZ_SAVE") != "1" or len(data) > 64 * 2**10:
        return
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"found-{hashlib.sha256(data).hexdigest()[:12]}").write_bytes(data)


def corpus_cases() -> list[tuple[str, Path]]:
    """(target, file) for every input kept in the corpus."""
    if not CORPUS.is_dir():
        return []
    return [(d.name, f) for d in sorted(CORPUS.iterdir()) if d.is_dir() for f in sorted(d.iterdir()) if f.is_file()]
