"""Aggregations: pure functions of the tangents and their directional derivatives, in a registry.

With k tangents ``v_1..v_k`` (the columns of ``B``, an ``n x k`` matrix over the *whole* concatenated parameter
vector) and their directional derivatives ``d = B^T grad f``, every aggregation here is a linear combination
of the tangents, ``g = B c``, so an aggregation is only the rule for its coefficients ``c`` (a ``(k,)``
tensor):

* ``mean``:       c = d / k              g = (1/k) B d: unbiased, variance / k
* ``sum``:        c = d                  g = B d: k grad f in expectation
* ``projection``: c = (B^T B)^{-1} d     g = B (B^T B)^{-1} B^T grad f, the orthogonal projection of grad f onto
                                         span(B): exact when k = n, residual orthogonal to every v_i.

An aggregation is a function ``rule(x: AggregationInput) -> c`` registered with
``@register_aggregation("name")``; it reads ``x.d``, ``x.k`` and, computed only if it asks, the Gram matrix
``x.gram = B^T B`` (float64) and the dimension ``x.n``. :func:`combine` then builds ``B c`` for every kind of
tangent (dense, rank-one factors, regenerated), and :func:`aggregate` does both.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Callable, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from fwdgrad.engine import RankOne, Regenerated, Tangent
from fwdgrad.errors import ConfigError
from fwdgrad.estimators.registry import Registry
from fwdgrad.estimators.tangents import dense_tangent

__all__ = [
    "AggregationInput",
    "Aggregation",
    "AGGREGATIONS",
    "register_aggregation",
    "aggregate",
    "combine",
    "combine_tangent",
    "gram_matrix",
    "solve_gram",
    "mean",
    "sum_",
    "projection",
]


class AggregationInput:
    """What an aggregation may use: the tangents, ``d = B^T grad f``, and on first use ``B^T B`` and ``n``.

    ``n`` (the number of scalar parameters) may be given; otherwise it is counted from the tangents (which
    regenerates a :class:`~fwdgrad.engine.Regenerated` tangent once to learn its shape).
    """

    def __init__(self, tangents: Mapping[str, Tangent], d: Tensor, n: Optional[int] = None) -> None:
        self.tangents = tangents
        self.d = d
        self._n = n

    @property
    def k(self) -> int:
        """The number of tangents."""
        return int(self.d.shape[0])

    @property
    def n(self) -> int:
        """The dimension of the parameter vector."""
        if self._n is None:
            self._n = sum(_numel_per_tangent(t) for t in self.tangents.values())
        return self._n

    @cached_property
    def gram(self) -> Tensor:
        """``B^T B`` (k x k, float64) over the whole parameter vector."""
        return gram_matrix(self.tangents, self.k, self.d.device)


#: ``rule(x) -> c``: the coefficients of ``g = B c`` (shape ``(k,)``).
Aggregation = Callable[[AggregationInput], Tensor]
#: Aggregations by name (a :class:`~fwdgrad.estimators.registry.Registry`).
AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")
#: ``@register_aggregation("name")`` on a rule ``x -> c``.
register_aggregation = AGGREGATIONS.register


def _numel_per_tangent(t: Tangent) -> int:
    if isinstance(t, RankOne):
        return math.prod(t.shape)
    return dense_tangent(t)[0].numel()


def gram_matrix(tangents: Mapping[str, Tangent], k: int, device: Optional[torch.device] = None) -> Tensor:
    """``B^T B``, the k x k Gram matrix of the tangents over the whole concatenated parameter vector.

    Accumulated per parameter tensor in float64. Rank-one blocks need only their factors:
    ``<u_i v_i^T, u_j v_j^T> = (u_i . u_j)(v_i . v_j)``, i.e. ``(U U^T) * (V V^T)`` elementwise.
    """
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for v in tangents.values():
        if isinstance(v, RankOne):
            gram += (v.u @ v.u.T).to(torch.float64) * (v.v @ v.v.T).to(torch.float64)
        else:
            flat = dense_tangent(v).reshape(k, -1)
            gram += (flat @ flat.T).to(torch.float64)
    return gram


def solve_gram(gram: Tensor, d: Tensor) -> Tensor:
    """``c = (B^T B)^{-1} d`` by Cholesky; the pseudo-inverse if ``B^T B`` is numerically singular.

    Nearly linearly dependent tangents make the Gram matrix singular; the least-squares (pinv) solution still
    gives ``B c`` = the orthogonal projection onto the span.
    """
    rhs = d.to(torch.float64).unsqueeze(1)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).squeeze(1)
    return (torch.linalg.pinv(gram, hermitian=True) @ rhs).squeeze(1)


@register_aggregation("mean")
def mean(x: AggregationInput) -> Tensor:
    """``g = (1/k) sum_i d_i v_i = (1/k) B d``: unbiased, variance / k."""
    return x.d / x.k


@register_aggregation("sum")
def sum_(x: AggregationInput) -> Tensor:
    """``g = sum_i d_i v_i = B d``: k grad f in expectation."""
    return x.d


@register_aggregation("projection")
def projection(x: AggregationInput) -> Tensor:
    """``g = B (B^T B)^{-1} B^T grad f = B (B^T B)^{-1} d``: grad f projected onto span(B) (whole vector)."""
    if x.k > x.n:
        raise ConfigError(
            f"projection needs num_tangents <= n (the number of parameters, {x.n}); got "
            f"num_tangents={x.k}. With k = n the projection is already exact."
        )
    return solve_gram(x.gram, x.d)


def combine_tangent(t: Tangent, c: Tensor) -> Tensor:
    """``g_p = sum_i c_i V_p[i]`` for one parameter tensor (never modifies ``t``)."""
    if isinstance(t, RankOne):
        # sum_i c_i u_i v_i^T = (U^T diag(c)) V: one (m x k)(k x n) product, never k dense matrices.
        c = c.to(t.u.dtype)
        if t.k == 1:
            return torch.outer(t.u[0] * c[0], t.v[0]).view(t.shape)
        return ((t.u.T * c) @ t.v).view(t.shape)
    if isinstance(t, Regenerated):
        v = t.dense()  # regenerated once, freshly: ours to scale in place when k = 1
        if t.k == 1:
            return v[0].mul_(c[0].to(v.dtype))
        return torch.tensordot(c.to(v.dtype), v, dims=1)
    if t.shape[0] == 1:  # one tangent: c_0 V[0], one elementwise op (tensordot costs ~20 us of Python here)
        return t[0] * c[0].to(t.dtype)
    # tensordot keeps it one GEMV over the (k, numel) block.
    return torch.tensordot(c.to(t.dtype), t, dims=1)


def combine(tangents: Mapping[str, Tangent], c: Tensor) -> Dict[str, Tensor]:
    """``g = B c`` per parameter tensor."""
    return {name: combine_tangent(t, c) for name, t in tangents.items()}


def aggregate(
    aggregation: Union[str, Aggregation], tangents: Mapping[str, Tangent], d: Tensor, n: Optional[int] = None
) -> Dict[str, Tensor]:
    """The estimate ``g = B c`` with ``c`` from the aggregation (a registered name or a rule).

    Never modifies ``tangents``, so the same tangents may be aggregated several ways.
    """
    rule = AGGREGATIONS.lookup(aggregation) if isinstance(aggregation, str) else aggregation
    return combine(tangents, rule(AggregationInput(tangents, d, n)))
