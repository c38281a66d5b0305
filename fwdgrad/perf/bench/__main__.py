"""``python -m fwdgrad.perf.bench [options]`` (``make bench``): torch is imported first and no process setting is
made beforehand, as in a user's own script."""

import sys

import torch  # noqa: F401  (first, as a user's script does)

from fwdgrad.perf.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
