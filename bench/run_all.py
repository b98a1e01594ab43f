"""`make bench`: run every bench/*_bench.py (and merge_quality.py) in turn; each updates bench/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
# helpers of a bench start with "_" (bench/_gptq_quality.py is quantize_bench's): not benches of their own
scripts = [p for p in sorted(here.glob("*_bench.py")) + sorted(here.glob("*_quality.py")) if not p.name.startswith("_")]
only = set(sys.argv[1:])
failed = []
for script in scripts:
    if only and script.stem not in only:
        continue
    print(f"== {script.name}", flush=True)
    if subprocess.call([sys.executable, str(script)]) != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"failed: {', '.join(failed)}")
