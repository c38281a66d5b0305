"""The estimator interface, the backprop baseline, the bridge to ``torch.optim`` and the parameter helpers.

Every estimator is a callable ``est(loss_fn, params) -> (loss, grads)`` where ``loss_fn`` maps the parameters
(a ``dict[str, Tensor]`` or a single ``Tensor``) to a scalar loss and ``grads`` has the structure of
``params``. The training loops never know which estimator they are driving.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Protocol, Tuple, Union, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fwdgrad.estimators.buffers import StepBuffers

__all__ = [
    "Params",
    "LossFn",
    "GradientEstimator",
    "DirectionalEstimator",
    "Backprop",
    "estimate_module_grads",
    "as_param_dict",
    "from_param_dict",
    "check_scalar_loss",
    "flatten",
    "total_numel",
    "cosine_similarity",
]

Params = Union[Tensor, Dict[str, Tensor]]
LossFn = Callable[[Params], Tensor]


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


class Backprop(GradientEstimator):
    """The exact gradient by reverse-mode autodiff: the baseline every forward gradient is compared with."""

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


def estimate_module_grads(
    estimator: GradientEstimator,
    model: nn.Module,
    loss_of_output: Callable[[Tensor], Tensor],
    *inputs: Tensor,
) -> Tensor:
    """Estimate the gradient of ``loss_of_output(model(*inputs))`` and write it into ``p.grad``.

    This is the bridge to the ``torch.optim`` world: after it, any optimizer, scheduler or
    ``clip_grad_norm_`` works unchanged. Parameters with ``requires_grad=False`` are held fixed. Buffers (e.g.
    batch norm's running statistics) move once per call, as in a backprop step, however often the estimator
    evaluates the loss (:class:`~fwdgrad.estimators.buffers.StepBuffers`). Returns the (detached) loss.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = StepBuffers(model)

    def loss_fn(p: Dict[str, Tensor]) -> Tensor:
        work = buffers.fresh()
        loss = loss_of_output(functional_call(model, (p, work), inputs))
        buffers.returned(work)
        return loss

    loss, grads = estimator(loss_fn, params)
    buffers.commit()
    for name, param in model.named_parameters():
        if name in grads:
            param.grad = grads[name].to(param.dtype)
    return loss
