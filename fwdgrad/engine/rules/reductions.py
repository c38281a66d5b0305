"""Rules for reductions and the normalisations built on them (softmax, log-softmax, cross-entropy).

sum and mean are linear: the tangent is the same reduction of the tangent. The others, with
``p = softmax(x)`` along the reduced dim:

    d logsumexp(x)      = sum_j p_j x_dot_j
    d log_softmax(x)_i  = x_dot_i - sum_j p_j x_dot_j
    d softmax(x)_i      = p_i (x_dot_i - sum_j p_j x_dot_j)
    d CE(x, y)          = sum_j p_j x_dot_j - x_dot_y         (per sample, then the reduction)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import dense, tdim, tdims
from fwdgrad.errors import Unsupported

T = torch.Tensor


def _linear_reduction(
    s: PassState, reduce: Callable[..., Tensor], x: Tensor, dim: Any, keepdim: bool, dtype: Any
) -> Tensor:
    out = reduce(x, dim=dim, keepdim=keepdim, dtype=dtype) if dim is not None else reduce(x, dtype=dtype)
    tx = dense(s.tangent(x))
    if x.dim() == 0:
        return s.attach(out, tx.to(out.dtype))
    return s.attach(out, reduce(tx, dim=tdims(dim, x.dim()), keepdim=keepdim, dtype=dtype))


@register(torch.sum, T.sum)
def _sum(s: PassState, x: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Tensor:
    return _linear_reduction(s, torch.sum, x, dim, keepdim, dtype)


@register(torch.mean, T.mean)
def _mean(s: PassState, x: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Tensor:
    return _linear_reduction(s, torch.mean, x, dim, keepdim, dtype)


@register(torch.logsumexp, T.logsumexp)
def _logsumexp(s: PassState, x: Tensor, dim: Any, keepdim: bool = False) -> Tensor:
    out = torch.logsumexp(x, dim=dim, keepdim=keepdim)
    if x.dim() == 0:  # logsumexp of one number is that number
        return s.attach(out, dense(s.tangent(x)))
    p = torch.exp(x - torch.logsumexp(x, dim=dim, keepdim=True))
    return s.attach(out, (dense(s.tangent(x)) * p).sum(dim=tdims(dim, x.dim()), keepdim=keepdim))


@register(F.log_softmax, torch.log_softmax, T.log_softmax)
def _log_softmax(
    s: PassState, x: Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype: Any = None
) -> Tensor:
    if dim is None or dtype is not None:
        raise Unsupported("log_softmax without an explicit dim, or with dtype")
    out = torch.log_softmax(x, dim)
    tx = dense(s.tangent(x))
    if x.dim() == 0:  # log_softmax of one number is 0 (and dim -1 would be the tangents' k dim below)
        return s.attach(out, torch.zeros_like(tx))
    p = torch.exp(out)
    return s.attach(out, tx - (tx * p).sum(dim=tdim(dim % x.dim()), keepdim=True))


@register(F.softmax, torch.softmax, T.softmax)
def _softmax(s: PassState, x: Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
    if dim is None or dtype is not None:
        raise Unsupported("softmax without an explicit dim, or with dtype")
    out = torch.softmax(x, dim)
    tx = dense(s.tangent(x))
    if x.dim() == 0:  # softmax of one number is 1
        return s.attach(out, torch.zeros_like(tx))
    return s.attach(out, out * (tx - (tx * out).sum(dim=tdim(dim % x.dim()), keepdim=True)))


@register(F.cross_entropy)
def _cross_entropy(
    s: PassState,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    if (
        weight is not None or size_average is not None or reduce is not None or label_smoothing != 0.0
        or input.dim() != 2 or target.dim() != 1 or target.is_floating_point()
        or bool((target == ignore_index).any())
    ):
        raise Unsupported("cross_entropy beyond (N, C) logits with class indices and default options")
    out = F.cross_entropy(input, target, reduction=reduction)
    tx = dense(s.tangent(input))
    k = tx.shape[0]
    p = torch.softmax(input, dim=1)
    per = (tx * p).sum(2) - tx.gather(2, target.view(1, -1, 1).expand(k, -1, 1)).squeeze(2)
    t = {"mean": lambda: per.mean(1), "sum": lambda: per.sum(1), "none": lambda: per}[reduction]()
    return s.attach(out, t)
