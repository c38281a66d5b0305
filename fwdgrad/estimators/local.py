"""Every estimator follows a model's local losses (:mod:`fwdgrad.nn.local_losses`).

For a model with ``local_losses`` the quantity to estimate is, for every block j, the gradient of its own loss
``L_j`` with respect to its own parameters (body and head). Two ways, chosen by the estimator's
``separate_local_losses``:

* **one call on the sum** (exact estimators, e.g. backprop: "LG-BP"): the blocks' inputs are detached, so
  ``grad_{theta_j} sum_i L_i = grad_{theta_j} L_j`` and one backward pass through the local graphs gives
  every block its own gradient. The objective is written ``L_last + sum_{j < last} (L_j - sg(L_j))``: its
  value is the output layer's loss (what a run logs), its gradient that of ``sum_j L_j``.
* **one call per block** (random estimators, e.g. ``gradient=forward``: "LG-FG-W"): block j's estimator sees
  ``L_j`` as a function of block j's parameters alone, so it draws its own tangents and gets its own
  directional derivatives ``<grad L_j, v_j>``; a forward gradient of the sum would mix the blocks' noise
  (``d = sum_j <grad L_j, v_j>``). The blocks' inputs come from one no-grad pass through the bodies first
  (one more forward pass than the single call), and block j's call replays the random state its body had in
  that pass (the same dropout masks as the single call).

Estimators with a module-level hook (activity perturbation, guesses) handle local losses themselves.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fwdgrad.errors import ConfigError
from fwdgrad.estimators.base import GradientEstimator, OutputLoss, mean_loss, write_grads
from fwdgrad.estimators.step_randomness import SameRandomness
from fwdgrad.nn.local_losses import LocalBlock, require_detached

__all__ = ["estimate_local_grads", "local_objective", "LocalObjective"]


def local_objective(blocks: Sequence[LocalBlock], x: Tensor, loss_of_output: OutputLoss) -> Tensor:
    """``L_last + sum_{j < last} (L_j - sg(L_j))``: the output layer's loss in value, the gradient of the sum of
    the blocks' local losses (each block's input detached unless the block says otherwise: ``L-BP``)."""
    h, total, extra = x, None, None
    for blk in blocks:
        h = blk.body(h.detach() if blk.detach else h)
        total = mean_loss(loss_of_output(blk.head(h)))
        if blk is not blocks[-1]:
            live = total - total.detach()  # zero in value, L_j in gradient
            extra = live if extra is None else extra + live
    assert total is not None
    return total if extra is None else total + extra


class LocalObjective(nn.Module):
    """``model``'s local objective as a module's forward, so ``functional_call`` can swap its parameters (the
    blocks are views on ``model``'s own layers, so its parameter names are ``model.<name>``)."""

    def __init__(self, model: nn.Module, blocks: Sequence[LocalBlock], loss_of_output: OutputLoss) -> None:
        super().__init__()
        self.model = model
        self._blocks = tuple(blocks)  # a tuple: not registered twice
        self._loss = loss_of_output

    def forward(self, x: Tensor) -> Tensor:
        return local_objective(self._blocks, x, self._loss)


def estimate_local_grads(
    estimator: GradientEstimator, model: nn.Module, blocks: Sequence[LocalBlock], loss_of_output: OutputLoss,
    inputs: Tuple[Tensor, ...],
) -> Tensor:
    """Write every block's local-loss gradient (as ``estimator`` estimates it) into ``p.grad``; returns the
    output layer's loss (module docstring)."""
    if len(inputs) != 1:
        raise ConfigError(f"a model trained with local losses takes one input tensor, got {len(inputs)}.")
    x = inputs[0]
    if not getattr(estimator, "separate_local_losses", True):
        wrapper = LocalObjective(model, blocks, loss_of_output)
        params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
        loss, grads = estimator(lambda p: functional_call(wrapper, p, (x,)), params)
        write_grads(wrapper, grads)
        return loss
    require_detached(blocks, type(estimator).__name__)
    # Every block's input by one no-grad pass through the bodies, with the random state before each body: block j's
    # own call replays it, so that its dropout masks are those of the chain (one random stream per step, as in
    # the single call on the sum).
    inputs, states = [x], []
    with torch.no_grad():
        for blk in blocks:
            states.append(SameRandomness([x.device]))
            if blk is not blocks[-1]:
                inputs.append(blk.body(inputs[-1]).detach())
    loss = x.new_zeros(())
    for blk, h, state in zip(blocks, inputs, states):
        state.restore()
        params = {n: p.detach() for n, p in blk.named_parameters() if p.requires_grad}

        def block_loss(p: dict, blk: LocalBlock = blk, h: Tensor = h) -> Tensor:
            return mean_loss(loss_of_output(functional_call(blk, p, (h,))))

        loss, grads = estimator(block_loss, params)
        write_grads(blk, grads)
    return loss
