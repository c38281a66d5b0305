"""frog's aggregations and the scaled projection: each rule against its formula on a whole-vector B, the scaled
projection's unbiasedness (statistical, exact variance), and the plain projection's visible step-size warning.

B is the n x k matrix of the tangents over the whole parameter vector (two tensors), d = B^T a the directional
derivatives of a loss with gradient a.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from estimator_problems import DT, Z, flat

from fwdgrad import ForwardGradient
from fwdgrad.app.config import threads
from fwdgrad.estimators import AGGREGATIONS, AggregationInput, aggregate
from fwdgrad.estimators.aggregation import PROJECTION_WARN_RATIO, advice_for
from fwdgrad.estimators.selection import TOP_K_MARGIN

SHAPES = {"w": (2, 3), "b": (2,)}  # n = 8


def _problem(k: int, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    lengths = 1 + torch.arange(k, dtype=DT)  # tangents of different lengths, so normalising matters
    tangents = {name: torch.randn((k, *s), generator=g, dtype=DT) * lengths.view(-1, *[1] * len(s))
                for name, s in SHAPES.items()}
    B = torch.cat([t.reshape(k, -1) for t in tangents.values()], dim=1).T
    a = torch.randn(B.shape[0], generator=g, dtype=DT) * scale
    return tangents, B, a, B.T @ a


def test_new_rules_are_registered_after_the_built_ins():
    assert list(AGGREGATIONS)[:3] == ["mean", "sum", "projection"]
    assert {"scaled_projection", "orthogonal_projection", "mean_times_dim", "max", "max_normalized",
            "mean_of_top_k"} <= set(AGGREGATIONS)


@pytest.mark.parametrize("k", [1, 4])
def test_each_rule_is_its_formula(k):
    tangents, B, a, d = _problem(k)
    n = B.shape[0]
    norms = B.norm(dim=0)
    j_max, j_cos = int(d.abs().argmax()), int((d.abs() / norms).argmax())
    score = d.abs() / norms
    keep = (score >= score.max() - TOP_K_MARGIN).to(DT)
    expected = {
        "scaled_projection": (n / k) * B @ torch.linalg.inv(B.T @ B) @ B.T @ a,
        "mean_times_dim": n * B @ d / k,
        "max": d[j_max] * B[:, j_max],
        "max_normalized": d[j_cos] * B[:, j_cos],
        "mean_of_top_k": B @ (keep * d) / k,
    }
    for name, g in expected.items():
        torch.testing.assert_close(flat(aggregate(name, tangents, d)), g, rtol=1e-10, atol=1e-12, msg=name)


def test_orthogonal_projection_is_projection_and_frogs_first_n_for_k_above_n():
    tangents, B, a, d = _problem(5)
    torch.testing.assert_close(flat(aggregate("orthogonal_projection", tangents, d)),
                               flat(aggregate("projection", tangents, d)))
    tangents, B, a, d = _problem(11, seed=4)  # k = 11 > n = 8: the first 8 tangents span R^8, so g = a
    c = AGGREGATIONS["orthogonal_projection"](AggregationInput(tangents, d))
    assert bool((c[8:] == 0).all())
    torch.testing.assert_close(flat(aggregate("orthogonal_projection", tangents, d)), a, rtol=1e-8, atol=1e-10)


def test_max_and_max_normalized_pick_different_tangents_when_lengths_differ():
    # a = (0.6, 0.8); v_1 = e_2 (short, cos 0.8), v_2 = 10 e_1 (long, cos 0.6): d = (0.8, 6). max takes the
    # largest |d| (v_2: g = 6 v_2), max_normalized the best angle (v_1: g = 0.8 v_1).
    a = torch.tensor([0.6, 0.8], dtype=DT)
    tangents = {"x": torch.tensor([[0.0, 1.0], [10.0, 0.0]], dtype=DT)}
    d = tangents["x"] @ a
    torch.testing.assert_close(aggregate("max", tangents, d)["x"], torch.tensor([60.0, 0.0], dtype=DT))
    torch.testing.assert_close(aggregate("max_normalized", tangents, d)["x"], torch.tensor([0.0, 0.8], dtype=DT))


def test_mean_of_top_k_margin_is_absolute_in_gradient_units():
    # the same directions: a tiny gradient keeps every tangent (the mean), a large one only the best
    tangents, B, a, _ = _problem(4, seed=3)
    for scale, rule in ((1e-4, "mean"), (1e4, "max_normalized")):
        d = B.T @ (a * scale)
        expected = flat(aggregate(rule, tangents, d)) / (4 if rule == "max_normalized" else 1)
        torch.testing.assert_close(flat(aggregate("mean_of_top_k", tangents, d)), expected)


def _scaled_projection_variance(a: torch.Tensor, k: int) -> torch.Tensor:
    """Var[g_j] of g = (n/k) P_U a for U spanned by k normal tangents (uniform random k-subspace).

    By rotation invariance about a, E[(P a)(P a)^T] = lam a a^T + mu (|a|^2 I - a a^T); |P a|^2 = |a|^2 cos^2 with
    cos^2 ~ Beta(k/2, (n-k)/2) gives lam = E[cos^4] = k(k+2)/(n(n+2)), and the trace k/n |a|^2 gives
    mu = k(n-k)/(n(n+2)(n-1)).
    """
    n = a.numel()
    lam = k * (k + 2) / (n * (n + 2))
    mu = k * (n - k) / (n * (n + 2) * (n - 1))
    second = (n / k) ** 2 * (lam * a**2 + mu * (a.square().sum() - a**2))
    return second - a**2


@pytest.mark.parametrize("distribution", ["normal", "varying_length"])
def test_scaled_projection_is_unbiased(distribution):
    """E[(n/k) P_U a] = a. Normal tangents: exact variance above; varying_length (k random coordinates, each kept
    with probability k/n): Var[g_j] = (n/k - 1) a_j^2. Z standard errors per component."""
    k, M = 3, 4000
    g0 = torch.Generator().manual_seed(11)
    grad = {name: torch.randn(s, generator=g0, dtype=DT) for name, s in SHAPES.items()}
    a = flat(grad)
    params = {name: torch.zeros(s, dtype=DT) for name, s in SHAPES.items()}
    est = ForwardGradient(k, "scaled_projection", distribution, seed=5, backend="simulated")

    def loss(p):
        return sum((grad[name] * p[name]).sum() for name in grad)

    with threads(1):  # thousands of tiny solves: one thread, no spinning
        samples = torch.stack([flat(est(loss, params)[1]) for _ in range(M)])
    n = a.numel()
    var = _scaled_projection_variance(a, k) if distribution == "normal" else (n / k - 1) * a**2
    se = (var / M).sqrt()
    err = (samples.mean(0) - a).abs()
    assert bool((err <= Z * se + 1e-12).all()), (err / se).max()
    # and the plain projection is (k/n) of it, draw by draw (same seed: same tangents)
    plain = ForwardGradient(k, "projection", distribution, seed=5, backend="simulated")
    scaled = ForwardGradient(k, "scaled_projection", distribution, seed=5, backend="simulated")
    torch.testing.assert_close(flat(scaled(loss, params)[1]) * (k / n), flat(plain(loss, params)[1]))


def test_variance_formula_matches_the_mean_scale():
    # sanity of the formula above: summed over components it is E|g|^2 - |a|^2 = (n/k - 1)|a|^2
    a = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(2))
    for k in (1, 3, 8):
        torch.testing.assert_close(_scaled_projection_variance(a, k).sum(), (8 / k - 1) * a.square().sum())


def test_plain_projection_warns_once_when_k_is_much_smaller_than_n(caplog):
    params = {"w": torch.zeros(1000, dtype=DT)}
    a = torch.randn(1000, dtype=DT, generator=torch.Generator().manual_seed(0))

    def loss(p):
        return (p["w"] * a).sum()

    with caplog.at_level(logging.WARNING, logger="fwdgrad.estimators.forward"):
        est = ForwardGradient(2, "projection", seed=0)
        for _ in range(3):
            est(loss, params)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "k/n = 0.002 of the mean's" in message and "scaled_projection" in message and "n/k = 500" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fwdgrad.estimators.forward"):
        for agg in ("scaled_projection", "mean"):
            ForwardGradient(2, agg, seed=0)(loss, params)
    assert not caplog.records


def test_projection_advice_only_below_the_ratio():
    rule = AGGREGATIONS["projection"]
    n = 1000
    k_edge = math.ceil(PROJECTION_WARN_RATIO * n)
    assert advice_for(rule, k_edge, n) is None and advice_for(rule, k_edge - 1, n) is not None
    assert advice_for(AGGREGATIONS["mean"], 1, 10**6) is None  # rules without advice
