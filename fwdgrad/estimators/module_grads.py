"""``estimate_module_grads``: any estimator on an ``nn.Module``, its estimate written into ``p.grad``.

The bridge to the ``torch.optim`` world. A module-level estimator (:class:`~fwdgrad.estimators.base.ModuleEstimator`)
takes the call through its own hook; a model trained by local losses goes through
:func:`~fwdgrad.estimators.local.estimate_local_grads`; every other case is one call of the estimator on the
model's parameters, with the buffers moving once (:class:`~fwdgrad.estimators.step_buffers.StepBuffers`).
"""

from __future__ import annotations

import logging
from typing import Dict

from torch import Tensor, nn
from torch.func import functional_call

from fwdgrad.estimators.base import GradientEstimator, OutputLoss, mean_loss, write_grads
from fwdgrad.estimators.local import estimate_local_grads
from fwdgrad.estimators.step_buffers import StepBuffers
from fwdgrad.nn.local_losses import local_blocks

__all__ = ["estimate_module_grads", "warn_perturbed_statistics"]

log = logging.getLogger(__name__)


def warn_perturbed_statistics(estimator: GradientEstimator, model: nn.Module) -> None:
    """Log once per estimator that ``model``'s batch-norm running statistics will come from a perturbed pass."""
    if estimator.__dict__.get("_warned_statistics"):
        return
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
           for m in model.modules()):
        estimator.__dict__["_warned_statistics"] = True
        log.warning("%s evaluates the loss only at perturbed parameters, so batch norm's running statistics are "
                    "updated from a perturbed pass (off by the size of the perturbation). For statistics at the "
                    "parameters themselves, use exact_loss=true (one more no-grad pass per step).",
                    type(estimator).__name__)


def estimate_module_grads(
    estimator: GradientEstimator,
    model: nn.Module,
    loss_of_output: OutputLoss,
    *inputs: Tensor,
) -> Tensor:
    """Estimate the gradient of ``loss_of_output(model(*inputs))`` and write it into ``p.grad``.

    This is the bridge to the ``torch.optim`` world: after it, any optimizer, scheduler or
    ``clip_grad_norm_`` works unchanged. Parameters with ``requires_grad=False`` are held fixed. Buffers (e.g.
    batch norm's running statistics) move once per call, as in a backprop step, however often the estimator
    evaluates the loss (:class:`~fwdgrad.estimators.step_buffers.StepBuffers`). Returns the (detached) loss.

    ``loss_of_output`` returns the loss, or one loss per example whose mean is the loss (estimators that work
    per example need that: :class:`ModuleEstimator`, whose hook is used when the estimator has one). With a model
    trained by local losses (``model.local_losses``), every estimator follows them
    (:func:`fwdgrad.estimators.local.estimate_local_grads`), and the loss returned is the output layer's.
    """
    hook = getattr(estimator, "estimate_module", None)
    if hook is not None:
        return hook(model, loss_of_output, inputs)
    blocks = local_blocks(model)
    if blocks is not None:
        return estimate_local_grads(estimator, model, blocks, loss_of_output, inputs)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = StepBuffers(model)
    if not estimator.first_evaluation_at_params:
        warn_perturbed_statistics(estimator, model)

    def loss_fn(p: Dict[str, Tensor]) -> Tensor:
        work = buffers.fresh()
        loss = mean_loss(loss_of_output(functional_call(model, (p, work), inputs)))
        buffers.returned(work)
        return loss

    loss, grads = estimator(loss_fn, params)
    buffers.commit()
    write_grads(model, grads)
    return loss
