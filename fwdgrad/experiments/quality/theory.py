"""Theory for Gaussian tangents: the law of the cosine between a forward gradient and the true gradient.

The derivation is in :mod:`fwdgrad.experiments.quality.analysis`'s docstring: ``cos^2 ~ Beta(alpha, beta)`` with
``(k/2, (n-k)/2)`` for the projection and ``(k/2, (n-1)/2)`` for the mean and the sum. The figures
(:mod:`fwdgrad.experiments.plots`) draw these curves and the tests derive their tolerances from them.
"""

from __future__ import annotations

import math

__all__ = ["SPLITTING_AGGREGATIONS", "cos2_beta_parameters", "cos2_variance", "expected_cos2", "expected_cosine",
           "expected_norm_ratio_sq"]

#: Aggregations that split the step over the tangents: same direction, sum = k * mean.
SPLITTING_AGGREGATIONS = ("mean", "sum")


def cos2_beta_parameters(aggregation: str, n: int, k: int) -> tuple[float, float]:
    """``(alpha, beta)`` with ``cos^2 ~ Beta(alpha, beta)`` for Gaussian tangents (module docstring)."""
    if aggregation == "projection":
        if k > n:
            raise ValueError(f"projection needs k <= n, got k={k}, n={n}.")
        return k / 2, (n - k) / 2
    if aggregation in SPLITTING_AGGREGATIONS:
        return k / 2, (n - 1) / 2
    raise ValueError(f"no Gaussian-tangent theory for aggregation {aggregation!r}.")


def expected_cos2(aggregation: str, n: int, k: int) -> float:
    """``E[cos^2]`` for Gaussian tangents: k/n (projection), k/(n+k-1) (mean, sum)."""
    a, b = cos2_beta_parameters(aggregation, n, k)
    return a / (a + b)


def cos2_variance(aggregation: str, n: int, k: int) -> float:
    """``Var[cos^2]`` for Gaussian tangents (Beta variance; projection: k(n-k) / (n^2 (n/2+1)))."""
    a, b = cos2_beta_parameters(aggregation, n, k)
    return a * b / ((a + b) ** 2 * (a + b + 1))


def expected_cosine(aggregation: str, n: int, k: int) -> float:
    """``E[cos]`` for Gaussian tangents: ``B(alpha+1/2, beta) / B(alpha, beta)`` with cos^2 ~ Beta(alpha, beta).

    The beta-function ratio is ``G(alpha+1/2) G(alpha+beta) / (G(alpha) G(alpha+beta+1/2))`` (G = Gamma), which
    does not involve ``G(beta)`` and is therefore also right (= 1) in the degenerate case beta = 0 (k = n for
    projection, n = 1 for mean).
    """
    a, b = cos2_beta_parameters(aggregation, n, k)
    return math.exp(math.lgamma(a + 0.5) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(a + b + 0.5))


def expected_norm_ratio_sq(aggregation: str, n: int, k: int) -> float:
    """``E[|g|^2] / |a|^2`` for Gaussian tangents: k/n (projection), (n+k+1)/k (mean), k(n+k+1) (sum)."""
    if aggregation == "projection":
        return expected_cos2("projection", n, k)
    if aggregation == "mean":
        return (n + k + 1) / k
    if aggregation == "sum":
        return k * (n + k + 1)
    raise ValueError(f"no Gaussian-tangent theory for aggregation {aggregation!r}.")
