"""Compare training runs side by side.

    python compare.py                                   # newest forward-gradient run vs newest backprop run
    python compare.py outputs/mnist/RUN_A outputs/mnist/RUN_B
    python compare.py multirun/2026-01-01/12-00-00/     # every run of a -m sweep, one line each
    python compare.py RUNS... --out results/cmp         # default: a new outputs/compare/<timestamp>/

Writes comparison.png and comparison.md and prints the table. See fwdgrad/compare.py for the run contract.
"""

import sys

from fwdgrad.compare import main

if __name__ == "__main__":
    sys.exit(main())
