"""``make bench``: the benchmark, ``python -m fwdgrad.perf.bench``; see :mod:`fwdgrad.perf.bench` for what it measures.

    .venv/bin/python scripts/bench.py --quick        # = python -m fwdgrad.perf.bench --quick
"""

import sys
from pathlib import Path

import torch  # noqa: F401  (first, as a user's script does: no process setting is made before it loads)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package lives next to scripts/
    sys.path.insert(0, str(ROOT))

from fwdgrad.perf.bench.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
