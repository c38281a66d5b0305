"""Aggregations: pure functions of the tangents and their directional derivatives, in a registry.

With k tangents ``v_1..v_k`` (the columns of ``B``, an ``n x k`` matrix over the *whole* concatenated parameter
vector) and their directional derivatives ``d = B^T grad f``, every aggregation here is a linear combination
of the tangents, ``g = B c``, so an aggregation is only the rule for its coefficients ``c`` (a ``(k,)``
tensor):

* ``mean``:       c = d / k              g = (1/k) B d: unbiased, variance / k
* ``sum``:        c = d                  g = B d: k grad f in expectation
* ``projection``: c = (B^T B)^{-1} d     g = B (B^T B)^{-1} B^T grad f = P_U grad f, the orthogonal projection of
                                         grad f onto U = span(B): exact when k = n, residual orthogonal to every
                                         v_i. For isotropic tangents E[P_U] = (k/n) I: its steps are k/n of the
                                         mean's (a warning says so when k << n)
* ``orthogonal_projection``: frog's name; ``projection``, and for k > n the projection onto the first n tangents
* ``scaled_projection``: c = (n/k) (B^T B)^{-1} d    g = (n/k) P_U grad f: unbiased for isotropic tangents
* ``mean_times_dim``: c = n d / k        g = (n/k) B d (frog's name): n grad f in expectation

and, in :mod:`~fwdgrad.estimators.selection`, rules that pick tangents by their ``d``: ``max``,
``max_normalized``, ``mean_of_top_k``.

An aggregation is a function ``rule(x: AggregationInput) -> c`` registered with
``@register_aggregation("name")``; it reads ``x.d``, ``x.k`` and, computed only if it asks, the Gram matrix
``x.gram = B^T B`` (float64), the squared lengths ``x.sq_norms = |v_i|^2`` and the dimension ``x.n``.
:func:`combine` then builds ``B c`` for every kind of tangent (dense, rank-one factors, regenerated), and
:func:`aggregate` does both.

"Isotropic tangents" below means a distribution of ``B`` whose law is invariant under signed permutations of
the coordinates (normal, rademacher, varying_length; normal also under every rotation). Then ``E[P_U]``
commutes with every signed permutation matrix, so it is a multiple of ``I``, and its trace is
``E[rank B] = k``: ``E[P_U] = (k/n) I``. (Structured tangents such as ``rank1`` are not isotropic in this
sense.)

A rule may carry advice about its step size: a function ``rule.advice(k, n) -> str | None`` (set with
:func:`with_advice`); :class:`~fwdgrad.ForwardGradient` logs its message once, as a warning, at its first step.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Callable, Dict, Mapping, Optional, TypeVar, Union

import torch
from torch import Tensor

from fwdgrad.engine import RankOne, Regenerated, Tangent
from fwdgrad.errors import ConfigError
from fwdgrad.estimators.registry import Registry
from fwdgrad.estimators.tangents.distributions import dense_tangent

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
    "orthogonal_projection",
    "scaled_projection",
    "mean_times_dim",
    "with_advice",
    "advice_for",
    "PROJECTION_WARN_RATIO",
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

    @cached_property
    def sq_norms(self) -> Tensor:
        """``|v_i|^2`` (shape ``(k,)``, float64): the Gram matrix's diagonal, without its off-diagonal work."""
        if "gram" in vars(self):
            return self.gram.diagonal().clone()
        return squared_norms(self.tangents, self.k, self.d.device)


#: ``rule(x) -> c``: the coefficients of ``g = B c`` (shape ``(k,)``).
Aggregation = Callable[[AggregationInput], Tensor]
#: ``advice(k, n) -> message or None``: what a user should know about a rule's step size at these k and n.
Advice = Callable[[int, int], Optional[str]]
R = TypeVar("R", bound=Callable[..., Tensor])
#: The plain projection warns when k/n is below this: its steps are then k/n of the mean's (module docstring).
PROJECTION_WARN_RATIO = 0.01
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


def squared_norms(tangents: Mapping[str, Tangent], k: int, device: Optional[torch.device] = None) -> Tensor:
    """``|v_i|^2`` over the whole parameter vector, in float64 (rank-one blocks: ``|u_i|^2 |v_i|^2``)."""
    out = torch.zeros(k, dtype=torch.float64, device=device)
    for v in tangents.values():
        if isinstance(v, RankOne):
            out += v.u.to(torch.float64).square().sum(1) * v.v.to(torch.float64).square().sum(1)
        else:
            out += dense_tangent(v).reshape(k, -1).to(torch.float64).square().sum(1)
    return out


def with_advice(advice: Advice) -> Callable[[R], R]:
    """Decorator: attach ``advice(k, n)`` to a rule (see the module docstring)."""

    def attach(rule: R) -> R:
        rule.advice = advice  # type: ignore[attr-defined]
        return rule

    return attach


def advice_for(rule: Aggregation, k: int, n: int) -> Optional[str]:
    """The rule's advice at these k and n, or None (also for rules without advice)."""
    advice = getattr(rule, "advice", None)
    return advice(k, n) if advice is not None else None


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


def _projection_advice(k: int, n: int) -> Optional[str]:
    if k / n >= PROJECTION_WARN_RATIO:
        return None
    return (f"aggregation 'projection' with k={k} tangents in n={n} dimensions: for isotropic tangents "
            f"E[P_U grad f] = (k/n) grad f = {k / n:.2g} grad f, so its steps are k/n = {k / n:.2g} of the mean's "
            "and a learning rate tuned for the mean barely moves the parameters. Use "
            "gradient.aggregation=scaled_projection ((n/k) P_U grad f: unbiased, steps like the mean's), or "
            f"multiply the learning rate by n/k = {n / k:.3g}.")


@register_aggregation("projection")
@with_advice(_projection_advice)
def projection(x: AggregationInput) -> Tensor:
    """``g = B (B^T B)^{-1} B^T grad f = B (B^T B)^{-1} d``: grad f projected onto span(B) (whole vector).

    Biased for k < n: ``E[g] = (k/n) grad f`` for isotropic tangents (warned about when k/n < 1%).
    """
    if x.k > x.n:
        raise ConfigError(
            f"projection needs num_tangents <= n (the number of parameters, {x.n}); got "
            f"num_tangents={x.k}. With k = n the projection is already exact."
        )
    return solve_gram(x.gram, x.d)


@register_aggregation("orthogonal_projection")
@with_advice(_projection_advice)
def orthogonal_projection(x: AggregationInput) -> Tensor:
    """frog's ``orthogonal_projection``: ``projection``, and for k > n the projection onto the first n tangents
    (``c_i = 0`` for i > n), which is then ``grad f`` exactly if they are independent (``projection`` refuses k > n).
    """
    if x.k <= x.n:
        return projection(x)
    c = torch.zeros(x.k, dtype=torch.float64, device=x.d.device)
    c[: x.n] = solve_gram(x.gram[: x.n, : x.n], x.d[: x.n])
    return c


@register_aggregation("scaled_projection")
def scaled_projection(x: AggregationInput) -> Tensor:
    """``g = (n/k) P_U grad f``: ``E[g] = (n/k) E[P_U] grad f = grad f`` for isotropic tangents (unbiased).

    Its second moment, ``E|g|^2 = (n/k)^2 E|P_U grad f|^2 = (n/k) |grad f|^2``, is just below the mean's
    ``(n+k+1)/k |grad f|^2`` (normal tangents), so the mean's learning rates carry over.
    """
    return projection(x) * (x.n / x.k)


@register_aggregation("mean_times_dim")
def mean_times_dim(x: AggregationInput) -> Tensor:
    """``g = (n/k) B d`` (frog's ``mean_times_dim``): ``E[g] = n grad f`` for ``E[v v^T] = I``, biased by n."""
    return x.d * (x.n / x.k)


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
