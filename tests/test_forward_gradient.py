"""ForwardGradient as a whole: exact directional derivatives, unbiasedness, projection geometry, seeding,
errors, the visible fallback of backend="auto", and its public stages.

Statistical checks use fixed seeds and bounds derived from the estimator's variance. For g = (grad f . v) v with
a = grad f, component j has
    normal tangents:      Var g_j = |a|^2 + a_j^2        (E[v_i^2 v_j^2] = 1 + 2 delta_ij)
    rademacher tangents:  Var g_j = |a|^2 - a_j^2        (v_j^2 = 1 exactly)
so the mean of M estimates has standard error sqrt(Var g_j / M) per component; we allow Z = 4.5 standard errors
(two-sided tail 7e-6 per component), small enough that a biased estimator is caught (checked below).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from estimator_problems import DT, PROBLEMS, Z, as_dict, flat, model_problem, true_grad
from torch import nn

from fwdgrad import Backprop, ForwardGradient, cosine_similarity, estimate_module_grads
from fwdgrad.parallel import DataParallelEstimator
from fwdgrad.engine import RankOne
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import DirectionalEstimator, TangentDraw
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.experiments.global_optim.functions import Beale, Rosenbrock


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dist", ["normal", "rademacher", "counter_normal"])
def test_directional_derivative_equals_backprop_inner_product(name, k, dist):
    loss_fn, params = PROBLEMS[name]()
    est = ForwardGradient(num_tangents=k, distribution=dist, seed=3)
    p = as_dict(params)
    single = not isinstance(params, dict)
    tangents = est.sample_tangents(p)
    loss, d = est.directional_derivatives(loss_fn, p, tangents, single)
    g = flat(true_grad(loss_fn, params))
    B = torch.cat([v.reshape(k, -1) for v in tangents.values()], dim=1)  # k x n
    torch.testing.assert_close(d, B @ g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_fn(params).detach())


@pytest.mark.parametrize("name", ["beale", "mlp"])
def test_single_tangent_estimate_is_d_times_v(name):
    loss_fn, params = PROBLEMS[name]()
    _, est_grad = ForwardGradient(seed=7)(loss_fn, params)
    v = flat(ForwardGradient(seed=7).sample_tangents(as_dict(params)))  # same seed: same tangent
    g = flat(true_grad(loss_fn, params))
    torch.testing.assert_close(flat(est_grad), (g @ v) * v, atol=1e-8, rtol=1e-8)


def _estimates(loss_fn, params, m: int, **kw) -> torch.Tensor:
    est = ForwardGradient(seed=11, **kw)
    return torch.stack([flat(est(loss_fn, params)[1]) for _ in range(m)])


def _max_z(samples: torch.Tensor, a: torch.Tensor, var: torch.Tensor) -> float:
    se = (var / samples.shape[0]).sqrt()
    return float(((samples.mean(0) - a).abs() / se).max())


@pytest.mark.parametrize("name", ["rosenbrock6", "mlp"])
@pytest.mark.parametrize("dist", ["normal", "rademacher", "counter_normal"])
def test_forward_gradient_is_unbiased(name, dist):
    loss_fn, params = PROBLEMS[name]()
    a = flat(true_grad(loss_fn, params))
    m = 4000
    samples = _estimates(loss_fn, params, m, distribution=dist)
    var = a.pow(2).sum() + (-a.pow(2) if dist == "rademacher" else a.pow(2))  # E v_j^4 = 3 (normal) or 1
    var = var.clamp_min(1e-12 * float(a.pow(2).sum()))
    assert _max_z(samples, a, var) < Z


def test_unbiasedness_check_catches_a_biased_estimator():
    # The same bound must reject "sum" with k = 2, whose expectation is 2 grad f (power of the test above).
    loss_fn, params = PROBLEMS["rosenbrock6"]()
    a = flat(true_grad(loss_fn, params))
    samples = _estimates(loss_fn, params, 4000, num_tangents=2, aggregation="sum")
    var = 2 * (a.pow(2).sum() + a.pow(2))  # variance of a sum of two independent single estimates
    assert _max_z(samples, a, var) > Z
    assert _max_z(samples, 2 * a, var) < Z


@pytest.mark.parametrize("k", [1, 4, 16])
def test_mean_aggregation_variance_falls_as_one_over_k(k):
    # E|g - a|^2 = (n + 1)|a|^2 / k for k normal tangents (sum over j of (|a|^2 + a_j^2) / k).
    loss_fn, params = PROBLEMS["mlp"]()
    a = flat(true_grad(loss_fn, params))
    n = a.numel()
    err = (_estimates(loss_fn, params, 1500, num_tangents=k) - a).pow(2).sum(1)
    expected = (n + 1) * float(a.pow(2).sum()) / k
    se = float(err.std()) / math.sqrt(err.numel())
    assert abs(float(err.mean()) - expected) < Z * se, (float(err.mean()), expected, se)


def test_projection_exact_when_k_equals_n_over_whole_parameter_vector():
    loss_fn, params = PROBLEMS["mlp"]()
    n = flat(params).numel()  # 5*7+7 + 7*3+3 = 66 across four tensors
    _, g = ForwardGradient(num_tangents=n, aggregation="projection", seed=0)(loss_fn, params)
    torch.testing.assert_close(flat(g), flat(true_grad(loss_fn, params)), atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_projection_residual_is_orthogonal_to_every_tangent(dist):
    loss_fn, params = PROBLEMS["mlp"]()
    k = 9
    est = ForwardGradient(num_tangents=k, aggregation="projection", distribution=dist, seed=5)
    _, g = est(loss_fn, params)
    tangents = ForwardGradient(num_tangents=k, distribution=dist, seed=5).sample_tangents(params)
    B = torch.cat([v.reshape(k, -1) for v in tangents.values()], dim=1)
    r = flat(true_grad(loss_fn, params)) - flat(g)
    # <r, v_i> = 0 for every tangent over the concatenated vector (a per-tensor projection fails this).
    assert float((B @ r).abs().max()) < 1e-9 * float(r.norm() * B.norm(dim=1).max())
    # And g lies in the span: projecting it again changes nothing.
    coeff = torch.linalg.lstsq(B.T, flat(g).unsqueeze(1)).solution
    torch.testing.assert_close((B.T @ coeff).squeeze(1), flat(g), atol=1e-9, rtol=1e-9)


def test_projection_cosine_grows_with_k_as_sqrt_k_over_n():
    # For Gaussian tangents span(B) is a uniformly random k-subspace, so cos^2(P grad, grad) ~ Beta(k/2, (n-k)/2):
    # mean k/n, variance k(n-k) / (n^2 (n/2 + 1)).
    loss_fn, params = PROBLEMS["mlp"]()
    a = true_grad(loss_fn, params)
    n = flat(a).numel()
    means = []
    for k in (1, 4, 16, 64):
        est = ForwardGradient(num_tangents=k, aggregation="projection", seed=k)
        cos2 = torch.tensor([cosine_similarity(est(loss_fn, params)[1], a) ** 2 for _ in range(300)])
        se = math.sqrt(k * (n - k) / (n**2 * (n / 2 + 1)) / cos2.numel())
        assert abs(float(cos2.mean()) - k / n) < Z * se
        means.append(float(cos2.mean()))
    assert means == sorted(means)


def test_same_seed_same_estimates_and_different_seed_differs():
    loss_fn, params = PROBLEMS["mlp"]()
    runs = [[flat(ForwardGradient(num_tangents=3, seed=s)(loss_fn, params)[1]) for _ in range(3)]
            for s in (1, 1, 2)]
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x, y)
    assert not torch.equal(runs[0][0], runs[2][0])


def test_single_tensor_params_return_a_tensor():
    f = Rosenbrock()
    x = torch.tensor([0.0, 0.0], dtype=DT)
    for est in (Backprop(), ForwardGradient(num_tangents=2, aggregation="projection")):
        loss, g = est(f, x)
        assert isinstance(g, torch.Tensor) and g.shape == x.shape and loss.dim() == 0
    # k = n = 2 projection is the exact gradient (-2, 0) of Rosenbrock at the origin.
    torch.testing.assert_close(g, torch.tensor([-2.0, 0.0], dtype=DT))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_tangents": 0}, "num_tangents must be an integer >= 1"),
        ({"num_tangents": -3}, "num_tangents must be an integer >= 1"),
        ({"num_tangents": 2.5}, "num_tangents must be an integer >= 1"),
        ({"aggregation": "median"}, "unknown aggregation 'median'; allowed: mean, sum, projection"),
        ({"distribution": "cauchy"}, "unknown tangent distribution 'cauchy'; allowed: normal, rademacher"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ForwardGradient(**kwargs)


def test_projection_with_more_tangents_than_parameters_raises():
    with pytest.raises(ValueError, match=r"num_tangents <= n \(the number of parameters, 2\)"):
        ForwardGradient(num_tangents=3, aggregation="projection")(Beale(), torch.zeros(2, dtype=DT))


@pytest.mark.parametrize("est", [Backprop(), ForwardGradient(), ForwardGradient(num_tangents=3)])
def test_non_scalar_loss_raises(est):
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        est(lambda x: x**2, torch.ones(3))


# -- moved from test_fast_paths.py: fallback, buffers, describe ---------------------------------------------------
def test_unsupported_op_falls_back_once_with_a_warning_or_raises_with_fast(caplog):
    x = torch.randn(4, 5, dtype=DT)
    loss_fn = lambda p: torch.log1p((x @ p["w"]).square()).sum()  # noqa: E731  (no log1p rule)
    params = {"w": torch.randn(5, 3, dtype=DT)}
    est = ForwardGradient(2, seed=0)
    with caplog.at_level(logging.WARNING, logger="fwdgrad.estimators"):
        _, g1 = est(loss_fn, params)
        _, g2 = est(loss_fn, params)
    assert caplog.text.count("fast path unavailable") == 1 and "log1p" in caplog.text
    ref = ForwardGradient(2, seed=0, backend="func")
    torch.testing.assert_close(g1["w"], ref(loss_fn, params)[1]["w"])
    torch.testing.assert_close(g2["w"], ref(loss_fn, params)[1]["w"])
    with pytest.raises(ValueError, match="backend='fast' cannot differentiate this loss: no forward rule for"):
        ForwardGradient(backend="fast")(loss_fn, params)
    with pytest.raises(ValueError, match="unknown backend 'jit'; allowed: auto, fast, func"):
        ForwardGradient(backend="jit")


def test_handed_out_estimates_are_never_overwritten_by_later_steps():
    for k in (1, 4):  # k = 1 hands out the tangent buffer itself; k > 1 reuses a tangent buffer across steps
        loss_fn, params = model_problem("mlp")
        est = ForwardGradient(k, seed=0)
        _, g1 = est(loss_fn, params)
        kept = {n: t.clone() for n, t in g1.items()}
        est(loss_fn, params)
        for n in kept:
            assert torch.equal(g1[n], kept[n])


def test_module_helper_with_rank1_trains_like_any_estimator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    loss = estimate_module_grads(ForwardGradient(distribution="rank1"), model, lambda o: cross_entropy(o, y), x)
    assert loss.dim() == 0 and all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_describe_logs_execution_settings_only_when_not_default():
    assert set(ForwardGradient().describe()) == {"estimator", "num_tangents", "aggregation", "distribution", "seed"}
    assert ForwardGradient(regenerate_tangents=False).describe()["regenerate_tangents"] is False
    with pytest.raises(ValueError, match="regenerate_tangents must be true, false or 'auto'"):
        ForwardGradient(regenerate_tangents="sometimes")
    d = ForwardGradient(distribution="rank1", backend="func", regenerate_tangents=True, max_tangent_mib=64).describe()
    assert d["distribution"] == "rank1" and d["backend"] == "func" and d["regenerate_tangents"] is True
    assert d["max_tangent_mib"] == 64


# -- the visible fallback ------------------------------------------------------------------------------------------
def _no_rule_problem():
    x = torch.randn(4, 5, dtype=DT, generator=torch.Generator().manual_seed(0))
    params = {"w": torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))}
    return (lambda p: torch.log1p((x @ p["w"]).square()).sum()), params  # no log1p rule


def test_fallback_is_visible_in_describe_and_as_an_attribute(caplog):
    loss_fn, params = _no_rule_problem()
    est = ForwardGradient(2, seed=0)
    assert est.fallback_reason is None and "backend" not in est.describe()
    with caplog.at_level(logging.WARNING, logger="fwdgrad.estimators"):
        est(loss_fn, params)
    assert "log1p" in est.fallback_reason
    described = est.describe()["backend"]
    assert described.startswith("func (fallback: ") and est.fallback_reason in described
    # the data-parallel wrapper (what the training loop describes) shows it too
    assert DataParallelEstimator(est).describe()["backend"] == described
    # backend="func" was chosen, not fallen back to: reported as such, with no reason
    func = ForwardGradient(2, seed=0, backend="func")
    func(loss_fn, params)
    assert func.fallback_reason is None and func.describe()["backend"] == "func"


def test_backend_fast_refuses_an_unsupported_loss_with_a_config_error():
    loss_fn, params = _no_rule_problem()
    with pytest.raises(ConfigError, match="backend='fast' cannot differentiate this loss"):
        ForwardGradient(backend="fast")(loss_fn, params)


# -- the public stages ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist,k,regen", [("normal", 1, "auto"), ("rank1", 3, "auto"), ("rademacher", 2, True)])
def test_public_stages_compose_to_the_call(dist, k, regen):
    loss_fn, params = model_problem("mlp", DT)
    whole = ForwardGradient(k, "projection", dist, seed=4, regenerate_tangents=regen)
    staged = ForwardGradient(k, "projection", dist, seed=4, regenerate_tangents=regen)
    assert isinstance(staged, DirectionalEstimator)
    for _ in range(2):
        loss, g = whole(loss_fn, params)
        draw = staged.draw(params)
        assert isinstance(draw, TangentDraw) and draw.n == flat(params).numel()
        assert isinstance(draw.tangents["net.0.weight"], RankOne) == (dist == "rank1")
        loss_s, d = staged.directional_derivatives(loss_fn, params, draw.tangents)
        g_s = staged.estimate(draw, d)
        assert torch.equal(loss, loss_s)
        for name in g:
            assert torch.equal(g[name], g_s[name])


def test_aggregate_leaves_the_tangents_untouched():
    loss_fn, params = PROBLEMS["mlp"]()
    est = ForwardGradient(1, seed=2)
    draw = est.draw(params)
    kept = {n: t.clone() for n, t in draw.dense().items()}
    _, d = est.directional_derivatives(loss_fn, params, draw.tangents)
    first = est.aggregate(draw.tangents, d)
    second = est.aggregate(draw.tangents, d)
    for n in kept:
        assert torch.equal(draw.dense()[n], kept[n]) and torch.equal(first[n], second[n])
