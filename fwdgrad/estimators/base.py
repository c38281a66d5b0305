"""The estimator interface, the backprop baseline, the bridge to ``torch.optim`` and the parameter helpers.

Every estimator is a callable ``est(loss_fn, params) -> (loss, grads)`` where ``loss_fn`` maps the parameters
(a ``dict[str, Tensor]`` or a single ``Tensor``) to a scalar loss and ``grads`` has the structure of
``params``. The training loops never know which estimator they are driving.

Estimators that need the model itself (activity perturbation perturbs its layer outputs; local-gradient guesses
read its blocks) implement the optional module-level hook of :class:`ModuleEstimator` instead, which
:func:`estimate_module_grads` calls; their functional call raises a :class:`~fwdgrad.errors.ConfigError`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Protocol, Tuple, Union, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fwdgrad.local_losses import local_blocks

__all__ = [
    "Params",
    "LossFn",
    "GradientEstimator",
    "DirectionalEstimator",
    "ModuleEstimator",
    "OutputLoss",
    "Backprop",
    "estimate_module_grads",
    "mean_loss",
    "write_grads",
    "as_param_dict",
    "from_param_dict",
    "check_scalar_loss",
    "flatten",
    "total_numel",
    "cosine_similarity",
]

Params = Union[Tensor, Dict[str, Tensor]]
LossFn = Callable[[Params], Tensor]
#: Maps a model's output to its loss: a scalar, or one loss per example (shape ``(N,)``, the loss being their
#: mean), which estimators that work per example need.
OutputLoss = Callable[[Tensor], Tensor]


# -- parameter helpers ------------------------------------------------------------------------------------------
def as_param_dict(params: Params) -> Tuple[Dict[str, Tensor], bool]:
    """``(dict_of_tensors, was_single_tensor)``: a single tensor becomes ``{"": tensor}``, so both call
    styles share one code path; :func:`from_param_dict` undoes it."""
    if isinstance(params, Tensor):
        return {"": params}, True
    if isinstance(params, Mapping):
        return dict(params), False
    raise TypeError(f"params must be a Tensor or a dict[str, Tensor], got {type(params).__name__}.")


def from_param_dict(d: Dict[str, Tensor], single: bool) -> Params:
    """The inverse of :func:`as_param_dict`: the tensor itself when the caller passed a single tensor."""
    return d[""] if single else d


def check_scalar_loss(loss: Any) -> None:
    """Raise ``ValueError`` unless ``loss`` is a 0-dim tensor (every estimator differentiates a scalar)."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {shape}; reduce the loss (e.g. .mean()) "
            "before returning it."
        )


def flatten(params: Params) -> Tensor:
    """The whole parameter vector: every tensor flattened and concatenated, in dict order."""
    return torch.cat([t.reshape(-1) for t in as_param_dict(params)[0].values()])


def total_numel(params: Params) -> int:
    """Number of scalar parameters n (the dimension the tangents live in)."""
    return int(sum(t.numel() for t in as_param_dict(params)[0].values()))


def cosine_similarity(a: Params, b: Params) -> float:
    """Cosine similarity of two parameter structures, taken over the whole concatenated vector."""
    da, db = as_param_dict(a)[0], as_param_dict(b)[0]
    dot = sum(float((da[n].double() * db[n].double()).sum()) for n in da)
    na = math.sqrt(sum(float(da[n].double().pow(2).sum()) for n in da))
    nb = math.sqrt(sum(float(db[n].double().pow(2).sum()) for n in db))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


# -- the interface ----------------------------------------------------------------------------------------------
class GradientEstimator(ABC):
    """Common interface: ``loss, grads = est(loss_fn, params)``."""

    #: With a model trained by local losses (:mod:`fwdgrad.local_losses`): True (default) estimates each block's
    #: loss by its own call, so a random estimate's noise never mixes blocks (each block's forward gradient has
    #: its own directional derivatives); False makes one call on the sum of the local losses, which gives each
    #: block its own loss's gradient exactly for an exact estimator (the blocks are detached), in one pass.
    separate_local_losses: bool = True

    @abstractmethod
    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        """Return the loss at ``params`` (detached) and a gradient estimate shaped like ``params``."""

    def describe(self) -> Dict[str, object]:
        """Settings worth logging next to a run (estimator name and hyper-parameters)."""
        return {"estimator": type(self).__name__}


@runtime_checkable
class DirectionalEstimator(Protocol):
    """An estimator whose estimate depends on the loss only through k directional derivatives ``d``.

    Its call is three public stages, so a wrapper may act between them (the data-parallel wrapper all-reduces
    the k + 1 scalars ``(loss, d)`` and nothing else)::

        draw = est.draw(params)                                          # this step's tangents
        loss, d = est.directional_derivatives(loss_fn, params, draw.tangents, single)
        grads = est.estimate(draw, d)                                    # g = B c(d), dict like params
    """

    def draw(self, params: Dict[str, Tensor]) -> Any: ...

    def directional_derivatives(
        self, loss_fn: LossFn, params: Dict[str, Tensor], tangents: Mapping[str, Any], single: bool = False
    ) -> Tuple[Tensor, Tensor]: ...

    def estimate(self, draw: Any, d: Tensor) -> Dict[str, Tensor]: ...


@runtime_checkable
class ModuleEstimator(Protocol):
    """An estimator that needs the model, not only a loss of its parameters (optional hook).

    ``estimate_module(model, loss_of_output, inputs)`` writes ``p.grad`` for the model's trainable parameters
    and returns the detached loss; ``loss_of_output`` returns one loss per example (see :data:`OutputLoss`).
    :func:`estimate_module_grads` calls it when present.
    """

    def estimate_module(self, model: nn.Module, loss_of_output: OutputLoss, inputs: Tuple[Tensor, ...]) -> Tensor: ...


class Backprop(GradientEstimator):
    """The exact gradient by reverse-mode autodiff: the baseline every forward gradient is compared with."""

    separate_local_losses = False  # exact: the sum of detached local losses has each block's own gradient

    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        p, single = as_param_dict(params)
        with torch.enable_grad():
            leaves = {name: t.detach().requires_grad_(True) for name, t in p.items()}
            loss = loss_fn(from_param_dict(leaves, single))
            check_scalar_loss(loss)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out = {
            name: (g if g is not None else torch.zeros_like(leaves[name]))
            for name, g in zip(leaves.keys(), grads)
        }
        return loss.detach(), from_param_dict(out, single)


def mean_loss(loss: Tensor) -> Tensor:
    """The loss itself if it is a scalar, else the mean of per-example losses."""
    return loss if loss.dim() == 0 else loss.mean()


def write_grads(module: nn.Module, grads: Mapping[str, Tensor]) -> None:
    """``p.grad = grads[name]`` for every parameter of ``module`` named in ``grads`` (in the parameter's dtype)."""
    for name, param in module.named_parameters():
        if name in grads:
            param.grad = grads[name].to(param.dtype)


def estimate_module_grads(
    estimator: GradientEstimator,
    model: nn.Module,
    loss_of_output: OutputLoss,
    *inputs: Tensor,
) -> Tensor:
    """Estimate the gradient of ``loss_of_output(model(*inputs))`` and write it into ``p.grad``.

    This is the bridge to the ``torch.optim`` world: after it, any optimizer, scheduler or
    ``clip_grad_norm_`` works unchanged. Parameters with ``requires_grad=False`` are held fixed; buffers
    (e.g. batch-norm statistics) are passed through. Returns the (detached) loss.

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
        from fwdgrad.estimators.local import estimate_local_grads  # (imports this module)

        return estimate_local_grads(estimator, model, blocks, loss_of_output, inputs)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_fn(p: Dict[str, Tensor]) -> Tensor:
        return mean_loss(loss_of_output(functional_call(model, (p, buffers), inputs)))

    loss, grads = estimator(loss_fn, params)
    write_grads(model, grads)
    return loss
