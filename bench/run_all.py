"""`make bench`: run every bench/*_bench.py (and merge_quality.py) in turn; each updates bench/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
scripts = sorted(here.glob("*_bench.py")) + sorted(here.glob("*_quality.py"))
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
