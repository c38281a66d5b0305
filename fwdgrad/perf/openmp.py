"""How long torch's OpenMP workers spin after a parallel region: shortened by default, before torch loads.

torch's Linux wheels use GNU OpenMP (libgomp). After every parallel region its worker threads *spin* waiting
for the next one: about 300,000 iterations (libgomp's "3 ms" default when ``OMP_WAIT_POLICY`` is unset), which
measured ~5 ms of CPU after a single 1M-float ``add_`` on the 2-core development machine. Backprop never
notices (all its work is parallel regions that the spinning worker picks up at once), but the forward
gradient draws its random numbers on its own threads (:mod:`fwdgrad.estimators.tangents.rng`; torch's CPU generator is
sequential), and for those ~5 ms the spinning worker holds a core the drawing threads need. The draw then runs
at serial speed with two threads (docs/performance-scaling.md).

``GOMP_SPINCOUNT=10000`` (about 0.1 ms) keeps the worker spinning through backprop's sub-millisecond gaps
between regions but lets it sleep before a draw. Measured at 2 threads on the benchmark's MLP (three
alternating pairs of processes): the dense k=1 step at batch 64 2.27-2.39x -> 1.71-1.87x backprop, FG-A at batch
1024 1.15-1.18x -> 1.10-1.13x, backprop's own step time unchanged; a chunked 2M-entry normal fill right after a
GEMM 5.6 -> 3.2 ms (median). ``OMP_WAIT_POLICY=PASSIVE`` (no spinning at all) made backprop at batch 64 30%
slower.

libgomp reads the variable once, when torch loads it, so :func:`shorten_openmp_spin` runs when ``fwdgrad`` is
imported (``fwdgrad/__init__.py``), before it imports torch; in a process that imported torch first it changes
nothing for that process (only for the processes it starts). A choice of your own wins: with
``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set in the environment, nothing is changed. This module must not
import torch.
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
