"""Aggregations as pure functions: each rule against its formula, combine for every tangent kind, the registry,
and a new aggregation used by ForwardGradient without editing it.

B is the n x k matrix of the tangents over the whole parameter vector (here two tensors, so a per-tensor
projection would fail), d = B^T a the directional derivatives of a loss with gradient a.
"""

from __future__ import annotations

import pytest
import torch
from estimator_problems import DT, flat, mlp_problem, true_grad

from fwdgrad import ForwardGradient
from fwdgrad.engine import RankOne, Regenerated
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import AGGREGATIONS, AggregationInput, aggregate, combine, register_aggregation
from fwdgrad.estimators.aggregation import projection

SHAPES = {"w": (4, 5), "b": (4,)}  # n = 24


def _tangents(k: int, seed: int = 0):
    """Dense tangents per tensor, their n x k matrix B, and a gradient a with d = B^T a."""
    g = torch.Generator().manual_seed(seed)
    tangents = {name: torch.randn((k, *s), generator=g, dtype=DT) for name, s in SHAPES.items()}
    B = torch.cat([t.reshape(k, -1) for t in tangents.values()], dim=1).T
    a = torch.randn(B.shape[0], generator=g, dtype=DT)
    return tangents, B, a, B.T @ a


@pytest.mark.parametrize("k", [1, 3])
def test_each_aggregation_is_its_formula(k):
    tangents, B, a, d = _tangents(k)
    expected = {
        "mean": B @ d / k,
        "sum": B @ d,
        "projection": B @ torch.linalg.inv(B.T @ B) @ B.T @ a,
    }
    for name, g in expected.items():
        torch.testing.assert_close(flat(aggregate(name, tangents, d)), g, rtol=1e-10, atol=1e-12)


def test_projection_is_exact_at_k_equal_n_and_orthogonal_below():
    tangents, B, a, d = _tangents(24, seed=1)
    torch.testing.assert_close(flat(aggregate("projection", tangents, d)), a, rtol=1e-8, atol=1e-10)
    tangents, B, a, d = _tangents(7, seed=2)
    r = a - flat(aggregate("projection", tangents, d))
    assert float((B.T @ r).abs().max()) < 1e-10 * float(a.norm())  # residual orthogonal to every tangent


def test_projection_of_dependent_tangents_uses_the_pseudo_inverse():
    tangents, B, a, d = _tangents(2, seed=3)
    twice = {n: torch.cat([t[:1], t[:1]]) for n, t in tangents.items()}  # v_2 = v_1: singular Gram matrix
    one = {n: t[:1] for n, t in tangents.items()}
    d2, d1 = torch.cat([d[:1], d[:1]]), d[:1]
    torch.testing.assert_close(flat(aggregate("projection", twice, d2)), flat(aggregate("projection", one, d1)))


def test_projection_refuses_more_tangents_than_parameters():
    tangents, _, _, d = _tangents(25)
    with pytest.raises(ConfigError, match=r"num_tangents <= n \(the number of parameters, 24\)"):
        aggregate("projection", tangents, d)


def test_gram_and_n_are_computed_only_when_asked():
    tangents, B, _, d = _tangents(3)
    x = AggregationInput(tangents, d)
    AGGREGATIONS["mean"](x)
    assert "gram" not in vars(x)
    assert x.k == 3 and x.n == 24
    torch.testing.assert_close(x.gram, B.T @ B)
    assert AggregationInput(tangents, d, n=99).n == 99  # given by the caller (no tangent is touched)


@pytest.mark.parametrize("k", [1, 3])
def test_combine_builds_B_c_for_every_tangent_kind(k):
    g = torch.Generator().manual_seed(4)
    r1 = RankOne(torch.randn(k, 4, generator=g, dtype=DT), torch.randn(k, 5, generator=g, dtype=DT), (4, 5))
    dense = torch.randn(k, 4, generator=g, dtype=DT)
    regen_source = torch.randn(k, 3, 2, generator=g, dtype=DT)
    regen = Regenerated(k, lambda: regen_source.clone())  # a fresh tensor at each use, like a real one
    c = torch.randn(k, generator=g, dtype=DT)
    out = combine({"r": r1, "d": dense, "g": regen}, c)
    kept = dense.clone()
    torch.testing.assert_close(out["r"], torch.tensordot(c, r1.dense(), dims=1))
    torch.testing.assert_close(out["d"], torch.tensordot(c, dense, dims=1))
    torch.testing.assert_close(out["g"], torch.tensordot(c, regen_source, dims=1))
    assert torch.equal(dense, kept)  # the tangents are never modified


def test_registry_rejects_duplicates_and_names_the_allowed_ones():
    with pytest.raises(ValueError, match="aggregation 'mean' is already registered"):
        register_aggregation("mean")(lambda x: x.d)
    with pytest.raises(ConfigError, match="unknown aggregation 'median'; allowed: mean, sum, projection"):
        AGGREGATIONS.lookup("median")


def test_a_registered_aggregation_is_used_by_forward_gradient():
    @register_aggregation("test_first_only")
    def first_only(x: AggregationInput) -> torch.Tensor:
        """``g = d_1 v_1``: the other tangents are ignored (unbiased, variance of k = 1)."""
        c = torch.zeros_like(x.d)
        c[0] = x.d[0]
        return c

    try:
        loss_fn, params = mlp_problem()
        _, g = ForwardGradient(3, "test_first_only", seed=6)(loss_fn, params)
        v = ForwardGradient(3, seed=6).sample_tangents(params)
        v1 = torch.cat([t[0].reshape(-1) for t in v.values()])
        torch.testing.assert_close(flat(g), (v1 @ flat(true_grad(loss_fn, params))) * v1)
    finally:
        del AGGREGATIONS["test_first_only"]


# -- moved from test_fast_paths.py ---------------------------------------------------------------------------------
def test_rank1_gram_from_factors_equals_dense_gram():
    g = torch.Generator().manual_seed(0)
    r1 = RankOne(torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 6, generator=g, dtype=DT), (4, 2, 3))
    bias = torch.randn(3, 4, generator=g, dtype=DT)
    d = torch.randn(3, generator=g, dtype=DT)
    c_factor = projection(AggregationInput({"w": r1, "b": bias}, d))
    c_dense = projection(AggregationInput({"w": r1.dense(), "b": bias}, d))
    torch.testing.assert_close(c_factor, c_dense)
