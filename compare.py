"""Compare training runs side by side.

    python compare.py                                   # newest forward-gradient run vs newest backprop run
    python compare.py outputs/mnist_fwdgrad/RUN_A outputs/mnist_backprop/RUN_B
    python compare.py outputs/mnist_fwdgrad/SWEEP_multirun/   # every run of a -m sweep, one line each
    python compare.py RUNS... --out results/cmp         # default: a new outputs/compare/<timestamp>/

Writes comparison.png and comparison.md and prints the table. The run contract: fwdgrad/experiments/training/run_files.py.
"""

import sys

from fwdgrad.app.process import prepare_process

prepare_process()  # first: the experiments extra, then opt-in process settings (before torch loads)

from fwdgrad.experiments.compare.runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
