"""Aggregations that pick tangents by their directional derivatives (Fluegel et al. 2024, frog's names).

Each is a coefficient rule ``c(x)`` with ``g = B c`` (:mod:`~fwdgrad.estimators.aggregation`), registered by name.
They are nonlinear in ``d`` (the choice of tangent depends on it), hence biased for k > 1; the docstrings give
``E[g]`` for normal tangents, where everything is rotation invariant about ``grad f``. There, writing
``v_i = (d_i / |a|^2) a + w_i`` with ``a = grad f`` and ``w_i`` orthogonal to ``a`` and independent of ``d_i``,
a rule that keeps tangents chosen from the ``d``'s gives ``E[g] = E[sum_i c_i d_i] a / |a|^2``: parallel to
``grad f``, with a scale that is not 1.

* ``max``: the tangent with the largest ``|d_i|``;
* ``max_normalized``: the tangent with the largest ``|d_i| / |v_i| = |grad f| |cos(v_i, grad f)|``;
* ``mean_of_top_k``: the mean over all k of ``d_i v_i`` for the tangents whose ``|d_i| / |v_i|`` is within
  :data:`TOP_K_MARGIN` of the largest (the others count as zero).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fwdgrad.estimators.aggregation import AggregationInput, register_aggregation

__all__ = ["TOP_K_MARGIN", "max_", "max_normalized", "mean_of_top_k"]

#: frog's margin for ``mean_of_top_k``: tangents with ``|d_i|/|v_i| >= max_j |d_j|/|v_j| - 0.1`` are kept. It is
#: absolute, in units of the gradient (``|d_i|/|v_i| = |grad f| |cos|``), not a cosine: with a gradient of norm
#: << 0.1 every tangent is kept (the rule is the mean); with a large one only the best (``max_normalized``).
TOP_K_MARGIN = 0.1


def _one_hot(x: AggregationInput, index: Tensor) -> Tensor:
    c = torch.zeros_like(x.d)
    c[index] = x.d[index]
    return c


@register_aggregation("max")
def max_(x: AggregationInput) -> Tensor:
    """``g = d_j v_j`` with ``j = argmax_i |d_i|``.

    Normal tangents: ``E[g] = E[max_i chi^2_1] grad f`` (the largest of k squared standard normals): unbiased at
    k = 1 only, longer in expectation as k grows (1.64 grad f at k = 2).
    """
    return _one_hot(x, x.d.abs().argmax())


@register_aggregation("max_normalized")
def max_normalized(x: AggregationInput) -> Tensor:
    """``g = d_j v_j`` with ``j = argmax_i |d_i| / |v_i|``: the tangent closest in angle to +-grad f.

    Normal tangents: ``|v_i|`` is independent of the direction, so ``E[g] = n E[max_i cos^2(v_i, grad f)]
    grad f`` (>= grad f; unbiased at k = 1 only).
    """
    return _one_hot(x, (x.d.to(torch.float64).abs() / x.sq_norms.sqrt()).argmax())


@register_aggregation("mean_of_top_k")
def mean_of_top_k(x: AggregationInput) -> Tensor:
    """``g = (1/k) sum_{i in S} d_i v_i``, ``S = {i : |d_i|/|v_i| >= max_j |d_j|/|v_j| - TOP_K_MARGIN}``.

    frog's rule, divided by all k (not by ``|S|``). Biased: ``E[g] = E[sum_{i in S} d_i^2 / |a|^2] / k grad f``
    for normal tangents; it is ``mean`` when every tangent is kept, ``max_normalized / k`` when one is.
    """
    score = x.d.to(torch.float64).abs() / x.sq_norms.sqrt()
    keep = score >= score.max() - TOP_K_MARGIN
    return torch.where(keep, x.d, torch.zeros_like(x.d)) / x.k
