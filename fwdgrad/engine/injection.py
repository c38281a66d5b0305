"""``z + eps`` at ``eps = 0``: activity perturbation's entry point into a forward-mode pass.

Activity-perturbed forward gradients (:mod:`fwdgrad.estimators.activity.forward_activity`) differentiate a network with respect
to a perturbation ``eps`` added to a layer's output ``z``, at ``eps = 0``. The sum ``z + eps`` then equals ``z``,
and its tangent is ``z_dot + u`` (u: the perturbation's tangent). :func:`add_perturbation` is that sum: plain
``z + eps`` outside the fast engine (under ``torch.func`` or no pass), and under the fast engine ``z``'s own
values with the tangent ``z_dot + u``, without computing the sum (one elementwise pass over every perturbed
layer's output less), when ``eps`` is visibly zero: a stride-0 tensor (one stored element, e.g.
``torch.zeros(()).expand(shape)``) whose element is 0. Any other ``eps`` gets the ordinary sum, and so does
every ``eps`` off the CPU: reading its element there would wait for the device (a sync per perturbed layer and
step), which costs more than the sum it saves.
"""

from __future__ import annotations

from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.rules.pointwise import _addsub
from fwdgrad.engine.state import PassState

__all__ = ["add_perturbation", "zero_perturbation"]


def zero_perturbation(like: Tensor, shape: tuple) -> Tensor:
    """A zero perturbation of ``shape`` (``like``'s dtype and device) that stores one element."""
    return like.new_zeros(()).expand(shape)


def add_perturbation(z: Tensor, eps: Tensor) -> Tensor:
    """``z + eps`` (module docstring); dispatched through ``__torch_function__`` so the fast engine sees it."""
    if has_torch_function((z, eps)):
        return handle_torch_function(add_perturbation, (z, eps), z, eps)
    return z + eps


def _is_zero(eps: Tensor, z: Tensor) -> bool:
    """Whether ``eps`` is a stride-0 zero of ``z``'s shape and dtype (checked on its one stored element; CPU only,
    where reading it does not wait for a device)."""
    return (eps.device.type == "cpu" and eps.shape == z.shape and eps.dtype == z.dtype
            and all(st == 0 for st in eps.stride())
            and float(eps[(0,) * eps.dim()] if eps.dim() else eps) == 0.0)


@register(add_perturbation)
def _add_perturbation(s: PassState, z: Tensor, eps: Tensor) -> Tensor:
    # z + 0 = z: an alias of z carries the tangent z_dot + u (a new tensor object, so z keeps its own tangent)
    out = z.detach() if _is_zero(eps, z) else z + eps
    return _addsub(s, z, eps, 1, 1, out)
