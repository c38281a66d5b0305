"""A module's buffers during one gradient step: updated once, whatever the estimator does.

Buffers such as batch norm's running statistics change *in the forward pass* (in training mode,
``running_mean <- (1 - momentum) running_mean + momentum * batch_mean``, and ``num_batches_tracked += 1``).
Backprop runs the forward pass once per step, so the buffers move once. An estimator may evaluate the loss
more than once per step, though, and each evaluation would move them again:

* the fast engine runs the k tangents in groups under a memory budget, repeating the primal pass per group;
* ``backend="auto"`` falls back to ``torch.func`` when the engine meets an op without a rule, after part of
  the fast pass (and some of its batch norms) already ran;
* ``torch.func.jvp`` refuses outright an in-place update of a tensor captured from outside the transformed
  function (``num_batches_tracked.add_(1)`` on the module's own buffer raises).

:class:`StepBuffers` makes all of these the backprop step: every evaluation works on its own fresh copy of
the buffers as they were when the step began (a copy made inside the evaluation, so ``torch.func`` may update
it), and after the estimator returns, :meth:`StepBuffers.commit` writes the buffers of the *first* evaluation
that returned into the module. Every evaluation of a forward-mode estimator is at the same parameters on the
same batch, so they all compute the same update; an evaluation that raised (the abandoned fast pass) never
counts. The copy made under ``vmap``/``jvp`` leaves the transform as a wrapper of a plain tensor;
``Tensor.copy_`` reads its value.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["StepBuffers", "forward_without_buffer_updates"]


class StepBuffers:
    """The buffers of ``model`` for one step (module docstring). Usage::

        buffers = StepBuffers(model)
        def loss_fn(p):
            work = buffers.fresh()                      # this evaluation's copy
            loss = loss_of(functional_call(model, (p, work), inputs))
            buffers.returned(work)                      # it got through
            return loss
        estimator(loss_fn, params)
        buffers.commit()                                # the module's buffers moved once
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.start: Dict[str, Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.first: Optional[Dict[str, Tensor]] = None

    def fresh(self) -> Dict[str, Tensor]:
        """A copy of the buffers as the step began, for one evaluation to update."""
        return {n: b.clone() for n, b in self.start.items()}

    def returned(self, work: Dict[str, Tensor]) -> None:
        """Record the buffers of an evaluation that returned (only the first one is kept)."""
        if self.first is None:
            self.first = work

    @torch.no_grad()
    def commit(self) -> None:
        """Write the first returned evaluation's buffers into the module (nothing if none returned)."""
        if self.first is None:
            return
        for name, b in self.model.named_buffers():
            if name in self.first:
                b.copy_(self.first[name])


def forward_without_buffer_updates(model: nn.Module, *inputs: Tensor) -> Tensor:
    """``model(*inputs)`` in its current mode, on copies of its buffers: a measurement (e.g. a training batch's
    accuracy) that must not move batch norm's running statistics a second time in the step."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    if not buffers:
        return model(*inputs)
    return functional_call(model, buffers, inputs, strict=False)
