"""Shared bench plumbing: run a command in a fresh process, measure its wall time and its own peak RSS, and keep
each bench's table in its own section of bench/RESULTS.md."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"  # generated checkpoints live here (git-ignored), never committed
RESULTS = BENCH / "RESULTS.md"
PY = sys.executable
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WEIGHTSMITH_QUIET": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # every run from scratch: no model facts or input digests remembered from an earlier run (a table that measures
    # the cache says so and sets it itself)
    "WEIGHTSMITH_CACHE": "off",
}


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float = 0.0  # user + system: less sensitive than wall time to other work on a shared machine


# Linux carries a process's peak RSS across exec, and a child forked (or vforked) from this big Python process
# would start from our RSS. A bare interpreter forks the measured command instead and reports its rusage.
_WRAPPER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - t} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} "
            f"{usage.ru_utime + usage.ru_stime}")
"""


def measure(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None) -> Run:
    """Wall time and peak RSS of exactly this command's process. Dirty pages are written back first, so that the
    writeback of the last run's output does not land inside this one's time."""
    os.sync()
    stats = WORK / f".measure-{os.getpid()}"
    WORK.mkdir(exist_ok=True)
    proc = subprocess.run(
        [PY, "-S", "-c", _WRAPPER, str(stats), *map(str, cmd)],
        cwd=cwd,
        env=env or ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seconds, maxrss_kb, code, cpu = stats.read_text().split()
    stats.unlink()
    if int(code) != 0 or proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({code}):\n{err[-3000:]}")
    return Run(float(seconds), int(maxrss_kb) / 1024, float(cpu))


def median_run(cmd: list[str], repeats: int = 3, prepare: Callable[[], None] | None = None, **kw) -> Run:
    """Medians of wall and CPU time over ``repeats`` runs (``prepare`` before each, e.g. removing the last output),
    the largest peak RSS."""
    runs = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        runs.append(measure(cmd, **kw))
    return Run(
        statistics.median(r.seconds for r in runs),
        max(r.peak_rss_mb for r in runs),
        statistics.median(r.cpu_seconds for r in runs),
    )


def python_cmd(code: str) -> list[str]:
    return [PY, "-c", code]


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str) -> None:
    """Replace (or add) this bench's section of RESULTS.md, leaving the other benches' sections alone."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nProduced by `make bench`.\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    print(markdown)
