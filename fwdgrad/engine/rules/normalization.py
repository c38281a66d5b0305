"""Rules for batch norm and layer norm.

Both compute ``y = w * x_hat + b`` with ``x_hat = (x - mu) / sigma``, ``sigma = sqrt(var + eps)``, the
statistics taken over the reduced dims R (batch norm: every dim but the channel dim 1; layer norm: the last
``len(normalized_shape)`` dims). When ``mu`` and ``var`` are statistics *of x itself* (layer norm; batch norm
in training mode or without running statistics) they move with x, and with ``<.>`` the mean over R:

    d mu    = <x_dot>
    d sigma = <(x - mu) x_dot> / sigma = <x_hat x_dot>          (since <x - mu> = 0)
    d x_hat = (x_dot - <x_dot> - x_hat <x_hat x_dot>) / sigma

When they are fixed running statistics (batch norm in eval mode), ``d x_hat = x_dot / sigma``. In both cases

    y_dot = w * d x_hat  +  w_dot * x_hat  +  b_dot.

Batch norm's running statistics are updated by the primal call, which runs once per pass: the k tangents
never touch them (and :class:`~fwdgrad.estimators.step_buffers.StepBuffers` keeps passes repeated within a step,
e.g. tangent groups, from moving them more than once).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.rules.pointwise import nested
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import Tangent, dense, k_of, tdims

__all__ = ["normalized_tangent"]


def normalized_tangent(
    s: PassState,
    x: Tensor,
    stats: Tuple[Tensor, Tensor],
    dims: Sequence[int],
    batch_stats: bool,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    param_shape: Sequence[int],
) -> Optional[Tensor]:
    """The ``(k, *x.shape)`` tangent of ``w * x_hat + b`` (module docstring), or None if nothing carries one.

    ``stats`` is ``(mu, 1 / sigma)``, broadcastable to ``x``; ``dims`` the reduced primal dims; ``param_shape``
    the shape ``weight`` and ``bias`` broadcast as (e.g. ``(1, C, 1, 1)``).
    """
    tx, tw, tb = dense(s.tangent(x)), s.tangent(weight), s.tangent(bias)
    if tx is None and tw is None and tb is None:
        return None
    k = k_of(tx, tw, tb)
    mu, inv = stats
    x_hat = (x - mu) * inv
    t: Optional[Tensor] = None
    if tx is not None:
        t = tx * inv if not batch_stats else _centred(tx, x_hat, tdims(dims, x.dim())).mul_(inv)
        if weight is not None:
            t.mul_(weight.view(param_shape))
    t = _add_param_tangent(t, tw, k, param_shape, x_hat)
    t = _add_param_tangent(t, tb, k, param_shape, None)
    return t if t.shape[1:] == x.shape else t.expand(k, *x.shape)


def _centred(tx: Tensor, x_hat: Tensor, tdims_: Tuple[int, ...]) -> Tensor:
    """``x_dot - <x_dot> - x_hat <x_hat x_dot>`` (a new tensor, in ``tx``'s memory layout)."""
    m1 = tx.mean(dim=tdims_, keepdim=True)
    m2 = (tx * x_hat).mean(dim=tdims_, keepdim=True)
    return (tx - m1).addcmul_(x_hat.expand_as(tx), m2.expand_as(tx), value=-1)


def _add_param_tangent(
    t: Optional[Tensor], tp: Optional[Tangent], k: int, param_shape: Sequence[int], factor: Optional[Tensor]
) -> Optional[Tensor]:
    """``t + factor * p_dot`` (``factor`` None: ``t + p_dot``) for a weight or bias tangent ``p_dot``."""
    if tp is None:
        return t
    tp = dense(tp).reshape(k, *param_shape)
    if t is None:
        return tp * factor if factor is not None else tp
    return t.addcmul_(factor.expand_as(t), tp.expand_as(t)) if factor is not None else t.add_(tp)


@register(F.batch_norm)  # (torch.batch_norm takes its arguments in another order: no rule, hence a fallback)
def _batch_norm(
    s: PassState,
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if s.tangent(t) is not None:
            raise ValueError(f"batch_norm: {name} carries tangents; running statistics are buffers, not parameters")
    tx = dense(s.tangent(input))
    if training and tx is not None and tx.shape[0] == 1 and not nested():
        return _batch_norm_train_one_tangent(s, input, tx, running_mean, running_var, weight, bias, momentum, eps)
    out = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)  # moves the stats
    dims = [0, *range(2, input.dim())]
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    batch_stats = training or running_mean is None or running_var is None
    if batch_stats:
        var, mu = torch.var_mean(input, dim=dims, correction=0, keepdim=True)
    else:
        var, mu = running_var.view(shape), running_mean.view(shape)
    t = normalized_tangent(s, input, (mu, torch.rsqrt(var + eps)), dims, batch_stats, weight, bias, shape)
    return s.attach(out, t)


@register(F.layer_norm, torch.layer_norm)
def _layer_norm(
    s: PassState,
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *args: object,  # torch.layer_norm's cudnn_enable: no effect on the values
) -> Tensor:
    ns = tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    dims = tuple(range(-len(ns), 0))
    # the output and the statistics it used (mean, 1/sigma, keepdim-shaped) from one kernel: no second pass over
    # the input for the tangent's statistics
    out, mu, inv = torch.native_layer_norm(input, list(ns), weight, bias, eps)
    shape = [1] * (input.dim() - len(ns)) + list(ns)
    t = normalized_tangent(s, input, (mu, inv), dims, True, weight, bias, shape)
    return s.attach(out, t)


def _batch_norm_train_one_tangent(
    s: PassState, input: Tensor, tx: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    weight: Optional[Tensor], bias: Optional[Tensor], momentum: float, eps: float,
) -> Tensor:
    """Training-mode batch norm with one tangent: the input's part through batch norm's own backward kernel.

    With batch statistics the Jacobian with respect to the input is symmetric (per channel
    ``w / sigma (I - 1 1^T / N - x_hat x_hat^T / N)``), so backprop's kernel applied to ``x_dot`` is the JVP: one
    fused pass instead of the elementwise ops of :func:`_centred`. ``native_batch_norm`` gives the output (moving
    the running statistics once, as ``F.batch_norm``) together with the batch mean and 1/sigma it used.
    """
    out, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
    t = torch.ops.aten.native_batch_norm_backward(
        tx[0], input, weight, running_mean, running_var, mean, invstd, True, eps, [True, False, False])[0]
    t = t.unsqueeze(0)
    tw, tb = s.tangent(weight), s.tangent(bias)
    shape = [1, 1, input.shape[1]] + [1] * (input.dim() - 2)  # (k, N, C, ...) broadcast of a channel vector
    if tw is not None:  # + w_dot x_hat
        x_hat = (input - mean.view(shape[1:])) * invstd.view(shape[1:])
        t = t.addcmul_(x_hat.unsqueeze(0), dense(tw).reshape(shape))
    if tb is not None:
        t = t.add_(dense(tb).reshape(shape))
    return s.attach(out, t)
