"""`make fuzz`: the parsers' fuzzing with the long Hypothesis profile, then the fault-injection tests, and their
figures written to the "fuzz" section of bench/RESULTS.md.

Run: .venv/bin/python bench/fuzz_figures.py   (about 10 minutes on 2 idle cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from _common import ENV, PY, WORK, table, write_section

ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "safetensors": "safetensors headers and byte mutations (convert, inspect)",
    "index_safetensors": "model.safetensors.index.json (convert)",
    "index_bin": "pytorch_model.bin.index.json (convert)",
    "bin": ".bin pickles (convert)",
    "adapter_config": "adapter_config.json (lora merge)",
    "config": "config.json (convert, quantize)",
    "merge": "merge YAML (merge)",
    "recipe": "recipe YAML (run --dry-run)",
}


def fuzz() -> tuple[dict, float]:
    """Every fuzz target under the "fuzz" profile; failing inputs are saved to tests/fuzz_corpus/."""
    figures = WORK / "fuzz.json"
    env = {**ENV, "HYPOTHESIS_PROFILE": "fuzz", "WEIGHTSMITH_FUZZ_SAVE": "1", "WEIGHTSMITH_FUZZ_FIGURES": str(figures)}
    started = time.perf_counter()
    code = subprocess.call(
        [PY, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env
    )
    seconds = time.perf_counter() - started
    result = json.loads(figures.read_text())
    result["pytest_exit"] = code
    return result, seconds


def faults() -> dict[str, int]:
    """Outcome counts of the fault-injection tests (tests/test_faults.py)."""
    report = WORK / "faults.xml"
    subprocess.call(
        [PY, "-m", "pytest", "tests/test_faults.py", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=ROOT,
        env=ENV,
    )
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None, f"{report}: no test suite"
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def main() -> None:
    WORK.mkdir(exist_ok=True)
    figures, seconds = fuzz()
    fault_counts = faults()
    totals = table(
        [
            "inputs tried",
            "accepted (output verifies)",
            "clean refusals (exit 2, one line)",
            "tracebacks",
            "partial outputs left",
            "hangs (> 30 s)",
            "code executed",
        ],
        [
            [f"{figures[k]:,}" for k in ("tried", "accepted", "refused")]
            + [figures[k] for k in ("tracebacks", "partial_outputs", "hangs", "code_executed")]
        ],
    )
    targets = table(
        ["target (command)", "inputs", "seconds in the command", "ms per input"],
        [
            [
                LABELS.get(name, name),
                f"{t['tried']:,}",
                f"{t['seconds']:.1f}",
                f"{1000 * t['seconds'] / t['tried']:.1f}",
            ]
            for name, t in figures["targets"].items()
        ],
    )
    load = os.getloadavg()[0]
    failed = fault_counts["failures"] + fault_counts["errors"]
    faults_line = (
        f"{fault_counts['tests']} tests: {fault_counts['passed']} passed, {failed} failed, {fault_counts['skipped']} "
        "skipped (the forbidden-folder test skips when the tests run as root)."
    )
    write_section(
        "fuzz",
        f"""## Faults and hostile inputs (`make fuzz`: `bench/fuzz_figures.py`)

Every parser an outside file reaches, fuzzed through the real command line in-process (Hypothesis profile `fuzz`,
tests/test_fuzz.py with the harness tests/fuzzing.py; pytest exit {figures["pytest_exit"]}), one run,
{seconds / 60:.1f} min wall on 2 cores (load average {load:.1f} at the end):

{totals}

{targets}

`make test` runs the same targets with a budget a quarter as large (Hypothesis profile `default`), plus every input
in tests/fuzz_corpus/ (the inputs that once broke something).

Fault injection (tests/test_faults.py: full disks on a real tmpfs and by RLIMIT_FSIZE, injected errnos, read-only
folders, SIGINT and SIGKILL mid-write followed by a clean re-run, a destination on another file system, concurrent
runs, inputs changed during a run, leftovers of dead and live runs; after each, the destination holds nothing or a
result `weightsmith verify` accepts):

{faults_line}
""",
    )


if __name__ == "__main__":
    main()
