"""How long torch's OpenMP workers spin after a parallel region: an opt-in process setting, made before torch loads.

torch's Linux wheels use GNU OpenMP (libgomp). After every parallel region its worker threads *spin* waiting
for the next one (about 300,000 iterations, libgomp's default when ``OMP_WAIT_POLICY`` is unset). Backprop
never notices, but a spinning worker holds a core that other threads of the step may need.
``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` (about 0.1 ms) keeps the worker spinning through backprop's short gaps
between regions but lets it sleep soon after. The measurements behind the choice are in
docs/performance-scaling.md.

libgomp reads the variable once, when torch loads it. A library must not change its host process, so fwdgrad
never calls :func:`shorten_openmp_spin` on import: the entry points opt in (:mod:`fwdgrad.app.process`), before
they import torch. A choice of your own wins: with ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set in the
environment, nothing is changed. This module must not import torch.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

__all__ = ["SPIN_COUNT", "openmp_spin_setting", "shorten_openmp_spin"]

#: Spin iterations of an idle libgomp worker (libgomp estimates ~100,000 per ms, so about 0.1 ms).
SPIN_COUNT = 10_000
#: Variables through which a user has already chosen the wait behaviour.
_USER_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def shorten_openmp_spin(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is set.

    Returns whether the variable was set here. It takes effect for this process only if torch has not been
    imported yet, and always for child processes (sweep workers) started afterwards.
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in _USER_CHOICES):
        return False
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


def openmp_spin_setting(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """The OpenMP wait setting in the environment, in words (for benchmark reports)."""
    env = os.environ if environ is None else environ
    chosen = [f"{name}={env[name]}" for name in _USER_CHOICES if name in env]
    return ", ".join(chosen) if chosen else "libgomp's default (spin ~300,000)"
