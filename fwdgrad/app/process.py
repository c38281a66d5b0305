"""What an entry point does to its own process before anything else: the settings a library must not make.

Every script of this repository (``mnist_*.py``, ``global_optim.py``, ``approx_quality.py``, ``compare.py``,
``scripts/*.py``) starts with::

    from fwdgrad.app.process import prepare_process
    prepare_process()          # before hydra, torch or the rest of fwdgrad is imported

which

1. checks that the ``experiments`` extra is installed (Hydra, matplotlib, pandas, ...). Without it the script
   prints one paragraph naming the install command and exits with status 2, instead of an ``ImportError``
   traceback;
2. opts this process in to a short OpenMP spin (:func:`fwdgrad.perf.openmp.shorten_openmp_spin`), which libgomp
   reads when torch loads, unless the user chose a wait setting;
3. registers the OmegaConf resolvers the configs use (:func:`fwdgrad.app.resolvers.register_resolvers`).

This module imports neither torch nor any package of the extra at its top, and importing it changes nothing:
only calling :func:`prepare_process` does.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import List, Sequence

__all__ = ["EXPERIMENT_PACKAGES", "missing_packages", "prepare_process"]

#: The import names the experiments need beyond torch (the ``experiments`` extra of pyproject.toml).
EXPERIMENT_PACKAGES = ("hydra", "omegaconf", "torchvision", "matplotlib", "pandas", "tensorboard", "tqdm",
                       "optuna", "sklearn", "scipy", "palmerpenguins")


def missing_packages(names: Sequence[str] = EXPERIMENT_PACKAGES) -> List[str]:
    """The import names among ``names`` that cannot be found (without importing any of them)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def prepare_process(prog: str | None = None) -> None:
    """Prepare this process for an entry point (module docstring); exit with status 2 when the extra is missing."""
    missing = missing_packages()
    if missing:
        prog = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "fwdgrad")
        sys.stderr.write(
            f"{prog}: error: this script needs fwdgrad's 'experiments' extra, which is not installed here "
            f"(missing: {', '.join(missing)}). The core library (the estimators, the engine, the models and "
            "estimate_module_grads) needs torch alone; the Hydra apps, plots and datasets need more. Install it "
            "with `pip install 'fwdgrad[experiments]'` (from a checkout: `pip install -e '.[experiments]'`, or "
            "`make setup`, which installs everything).\n")
        raise SystemExit(2)
    from fwdgrad.perf.openmp import shorten_openmp_spin

    shorten_openmp_spin()  # for this process if torch is not loaded yet, and for every process it starts
    from fwdgrad.app.resolvers import register_resolvers

    register_resolvers()
