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
from typing import Iterable, Iterator, List, Sequence

import torch
from torch import Tensor

__all__ = ["SameRandomness", "randomness_untouched", "rng_states", "set_rng_states"]


def _cuda_devices(devices: Iterable[torch.device]) -> List[torch.device]:
    return sorted({d for d in devices if d.type == "cuda"}, key=str)


def rng_states(devices: Iterable[torch.device]) -> List[Tensor]:
    """The global generators' states: the CPU's, then each CUDA device's among ``devices`` (byte tensors on the
    CPU, in a fixed order)."""
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in _cuda_devices(devices)]


def set_rng_states(states: Sequence[Tensor], devices: Iterable[torch.device]) -> None:
    """Set what :func:`rng_states` returned for the same ``devices``."""
    torch.set_rng_state(states[0])
    for state, d in zip(states[1:], _cuda_devices(devices)):
        torch.cuda.set_rng_state(state, d)


class SameRandomness:
    """The global random state at the start of a step (CPU, and each CUDA device given); :meth:`restore` before
    each later pass of the step."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._devices = list(devices)
        self._states = rng_states(self._devices)

    def restore(self) -> None:
        set_rng_states(self._states, self._devices)


@contextlib.contextmanager
def randomness_untouched(devices: Iterable[torch.device]) -> Iterator[None]:
    """Run the block (e.g. a probe pass that is not part of the step) and leave the global generators as they
    were before it."""
    state = SameRandomness(devices)
    try:
        yield
    finally:
        state.restore()
