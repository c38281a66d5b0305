"""Variance of forward-gradient estimates, per component, for dense and rank-one tangents.

For one tangent and the true gradient ``a`` (over all parameters), the estimate ``g = <a, V> V`` has, per
component:

* dense normal tangents:      Var g_j = |a|^2 + a_j^2          (E[v_i^2 v_j^2] = 1 + 2 delta_ij)
* dense rademacher tangents:  Var g_j = |a|^2 - a_j^2          (v_j^2 = 1 exactly)
* rank-one tangents ``u v^T`` (u ~ N(0, I_m), v ~ N(0, I_n)) on a weight block ``A`` (m x n; a conv kernel
  read as ``out x (in*kh*kw)``), with normal tangents on every parameter with fewer than two dims:

      Var g_ij = |a|^2 + 2 |A_i,:|^2 + 2 |A_:,j|^2 + 3 A_ij^2

  Derivation: ``g_ij = d u_i v_j`` with ``d = u^T A v + r``, where ``r`` (the other parameters' share of
  ``d``) is independent of (u, v) with ``E[r^2] = |a|^2 - |A|^2``. Gaussian moments give
  ``E[u_k u_k' u_i^2] = delta_kk' (1 + 2 delta_ki)``, so
  ``E[(u^T A v)^2 u_i^2 v_j^2] = sum_kl A_kl^2 (1 + 2 delta_ki)(1 + 2 delta_lj)
  = |A|^2 + 2 |A_i,:|^2 + 2 |A_:,j|^2 + 4 A_ij^2``; add ``E[r^2]`` and subtract ``E[g_ij]^2 = A_ij^2``.

Summed over a block, rank-one adds ``(2m + 2n + 2) |A|^2`` to the dense ``(mn) |a|^2 + |A|^2``: negligible
when ``mn |a|^2`` dominates, which is why its cosine similarity to the gradient matches dense tangents'.
With k tangents and ``mean`` aggregation every variance is divided by k (independent tangents).
"""

from __future__ import annotations

from typing import Dict, Mapping

from torch import Tensor

__all__ = ["component_variance", "total_variance"]


def component_variance(grad: Mapping[str, Tensor], distribution: str, num_tangents: int = 1) -> Dict[str, Tensor]:
    """Per-component variance of the ``mean`` forward-gradient estimate with ``num_tangents`` tangents.

    Args:
        grad: the true gradient ``a``, per parameter tensor.
        distribution: ``"normal"`` (or ``"counter_normal"``: the same distribution), ``"rademacher"`` or ``"rank1"``.
        num_tangents: k (the variance of the mean of k independent estimates is divided by k).
    """
    a2 = sum(float(t.double().pow(2).sum()) for t in grad.values())
    out: Dict[str, Tensor] = {}
    for name, t in grad.items():
        t = t.double()
        if distribution in ("normal", "counter_normal") or (distribution == "rank1" and t.dim() < 2):
            var = a2 + t.pow(2)
        elif distribution == "rademacher":
            var = a2 - t.pow(2)
        elif distribution == "rank1":
            A = t.reshape(t.shape[0], -1)
            rows = A.pow(2).sum(1, keepdim=True)  # |A_i,:|^2
            cols = A.pow(2).sum(0, keepdim=True)  # |A_:,j|^2
            var = (a2 + 2 * rows + 2 * cols + 3 * A.pow(2)).reshape(t.shape)
        else:
            raise ValueError(f"no variance formula for distribution {distribution!r}; use normal, counter_normal, rademacher or rank1.")
        out[name] = var / num_tangents
    return out


def total_variance(grad: Mapping[str, Tensor], distribution: str, num_tangents: int = 1) -> float:
    """``E|g - a|^2``: the per-component variances summed over every parameter."""
    return float(sum(v.sum() for v in component_variance(grad, distribution, num_tangents).values()))

