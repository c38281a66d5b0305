"""One random stream per step: every evaluation of the loss in a step draws the same numbers from torch's global
generators (dropout masks, noise layers), so that all of a step's passes evaluate one and the same function.

An estimator may evaluate the loss more than once per step: the fast engine's tangent groups (a memory budget,
each group repeats the primal pass), the visible fallback to ``torch.func`` after a partial fast pass, activity
perturbation's recording pass, zeroth order's 2k + 1 evaluations. Backprop evaluates once; a dropout mask that
changed between the passes of one step would make the k directional derivatives those of different functions
(at k = n with the projection, g would not be any function's gradient). :class:`SameRandomness` captures the
global state when the step begins; :meth:`~SameRandomness.restore` before every later pass replays it, so after
the step the generators stand where one pass leaves them, as after a backprop step.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

__all__ = ["SameRandomness", "randomness_untouched"]


class SameRandomness:
    """The global random state at the start of a step (CPU, and each CUDA device given); :meth:`restore` before
    each later pass of the step."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda = {d: torch.cuda.get_rng_state(d) for d in set(devices) if d.type == "cuda"}

    def restore(self) -> None:
        torch.set_rng_state(self._cpu)
        for device, state in self._cuda.items():
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def randomness_untouched(devices: Iterable[torch.device]) -> Iterator[None]:
    """Run the block (e.g. a probe pass that is not part of the step) and leave the global generators as they
    were before it."""
    state = SameRandomness(devices)
    try:
        yield
    finally:
        state.restore()
