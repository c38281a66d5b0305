"""The estimator interface, the backprop baseline and the parameter helpers.

Every estimator is a callable ``est(loss_fn, params) -> (loss, grads)`` where ``loss_fn`` maps the parameters
(a ``dict[str, Tensor]`` or a single ``Tensor``) to a scalar loss and ``grads`` has the structure of
``params``. The training loops never know which estimator they are driving.

Every estimator's ``__call__`` (:meth:`GradientEstimator.__call__`, which calls the subclass's ``compute``) makes
the input checks that no estimator should have to repeat: ``params`` must be a non-empty tensor or dict of
floating-point tensors (an empty dict has nothing to differentiate; an integer tensor has no gradient, and a
rademacher forward gradient of it would come out as integers), and ``loss_fn`` must leave the caller's tensors as
they were (each call of it is followed by a look at the tensors' version counters, which every in-place write
increments).
Estimators that need the model itself (activity perturbation perturbs its layer outputs; local-gradient guesses
read its blocks) implement the optional module-level hook of :class:`ModuleEstimator` instead, which
:func:`~fwdgrad.estimators.module_grads.estimate_module_grads` calls; their functional call raises a :class:`~fwdgrad.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import torch
from torch import Tensor, nn

from fwdgrad.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "Params",
    "LossFn",
    "GradientEstimator",
    "DirectionalEstimator",
    "ModuleEstimator",
    "OutputLoss",
    "run_stages",
    "Backprop",
    "mean_loss",
    "write_grads",
    "as_param_dict",
    "from_param_dict",
    "check_params",
    "check_scalar_loss",
    "check_seed",
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


def check_params(params: Params) -> List[Tensor]:
    """The tensors of ``params``; raises :class:`~fwdgrad.errors.ConfigError` unless they are a non-empty set of
    floating-point tensors (``TypeError`` for something that is not a tensor or a dict)."""
    p, _ = as_param_dict(params)
    if not p:
        raise ConfigError("params is an empty dict: there is nothing to differentiate. Pass a tensor or a dict "
                          "with at least one tensor (for a model: are all its parameters requires_grad=False?).")
    for name, t in p.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"params[{name!r}] is a {type(t).__name__}, not a Tensor.")
        if not (t.is_floating_point() or t.is_complex()):
            where = "params" if name == "" else f"params[{name!r}]"
            raise ConfigError(f"{where} has dtype {t.dtype}: a gradient needs floating-point parameters (an "
                              "integer tensor has no derivative, and an estimate of it would be rounded to "
                              "integers). Convert it first, e.g. x.float() or x.double().")
    return list(p.values())


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int, if it is an integer in ``[0, 2**63)`` (torch generators take 64-bit seeds, and seeded
    chunks add their index to it); else :class:`~fwdgrad.errors.ConfigError` naming ``what``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
        raise ConfigError(f"{what} must be an integer in [0, 2**63), got {seed!r}; e.g. {what}=0.")
    return int(seed)


def _guard_against_in_place(loss_fn: LossFn, tensors: List[Tensor]) -> LossFn:
    """``loss_fn``, raising :class:`ConfigError` if a call of it wrote into one of ``tensors`` (the caller's)."""

    def guarded(p: Params) -> Tensor:
        before = [t._version for t in tensors]
        loss = loss_fn(p)
        if any(t._version != v for t, v in zip(tensors, before)):
            raise ConfigError(
                "loss_fn modified the parameters it was given in place (e.g. p.mul_(2), p[0] = 0, or an "
                "in-place layer on a parameter); the caller's tensors were changed by it. An estimator needs a "
                "loss_fn without side effects: use out-of-place operations (p * 2) on the parameters."
            )
        return loss

    return guarded


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
    """Common interface: ``loss, grads = est(loss_fn, params)``.

    ``__call__`` makes the input checks of the module docstring (:func:`check_params`, and a ``loss_fn`` that
    writes into the caller's tensors raises :class:`~fwdgrad.errors.ConfigError`), then calls the subclass's
    :meth:`compute`, which does the estimator's work; the estimator's own code may still modify tensors in
    place between its calls of ``loss_fn``.
    """

    #: With a model trained by local losses (:mod:`fwdgrad.nn.local_losses`): True (default) estimates each block's
    #: loss by its own call, so a random estimate's noise never mixes blocks (each block's forward gradient has
    #: its own directional derivatives); False makes one call on the sum of the local losses, which gives each
    #: block its own loss's gradient exactly for an exact estimator (the blocks are detached), in one pass.
    separate_local_losses: bool = True

    #: Whether a step's first evaluation of the loss is at the given parameters: batch norm's running statistics
    #: are taken from it (:class:`~fwdgrad.estimators.step_buffers.StepBuffers`). An estimator whose first evaluation is
    #: perturbed says False, and :func:`estimate_module_grads` warns that the statistics come from a perturbed pass.
    first_evaluation_at_params: bool = True

    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        """Return the loss at ``params`` (detached) and a gradient estimate shaped like ``params``."""
        tensors = check_params(params)
        return self.compute(_guard_against_in_place(loss_fn, tensors), params)

    @abstractmethod
    def compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        """The estimator's work behind :meth:`__call__`, on checked inputs (what a subclass implements)."""

    def describe(self) -> Dict[str, object]:
        """Settings worth logging next to a run (estimator name and hyper-parameters)."""
        return {"estimator": type(self).__name__}

    def state_dict(self) -> Optional[Dict[str, Any]]:
        """The state that makes the estimator's next estimates what they would have been (random generators),
        for a checkpoint that ``resume=`` continues exactly; ``None`` (the default) means it cannot be saved,
        and a run with it cannot be resumed. Stateless estimators return ``{}``."""
        return None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ConfigError(f"{type(self).__name__} keeps no state, but a checkpoint holds some for it.")


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


def run_stages(est: DirectionalEstimator, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
    """``est(loss_fn, params)`` for a :class:`DirectionalEstimator`: its three stages in order, on detached
    parameters, the estimate shaped like ``params``."""
    p, single = as_param_dict(params)
    p = {name: t.detach() for name, t in p.items()}
    draw = est.draw(p)
    loss, d = est.directional_derivatives(loss_fn, p, draw.tangents, single)
    return loss, from_param_dict(est.estimate(draw, d), single)


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

    def compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        p, single = as_param_dict(params)
        with torch.enable_grad():
            leaves = {name: t.detach().requires_grad_(True) for name, t in p.items()}
            try:
                loss = loss_fn(from_param_dict(leaves, single))
            except RuntimeError as err:
                if "in-place operation" not in str(err):
                    raise
                # autograd refuses an in-place write into a leaf that requires grad, before it happens
                raise ConfigError(
                    f"loss_fn modifies the parameters it was given in place ({err}); backprop cannot "
                    "differentiate that, and the caller's tensors are unchanged. Use out-of-place operations "
                    "(p * 2 instead of p.mul_(2)) on the parameters."
                ) from None
            check_scalar_loss(loss)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out = {
            name: (g if g is not None else torch.zeros_like(leaves[name]))
            for name, g in zip(leaves.keys(), grads)
        }
        return loss.detach(), from_param_dict(out, single)

    def state_dict(self) -> Dict[str, Any]:
        return {}  # exact: nothing random


def mean_loss(loss: Tensor) -> Tensor:
    """The loss itself if it is a scalar, else the mean of per-example losses."""
    return loss if loss.dim() == 0 else loss.mean()


def write_grads(module: nn.Module, grads: Mapping[str, Tensor]) -> None:
    """``p.grad = grads[name]`` for every parameter of ``module`` named in ``grads`` (in the parameter's dtype)."""
    for name, param in module.named_parameters():
        if name in grads:
            param.grad = grads[name].to(param.dtype)
