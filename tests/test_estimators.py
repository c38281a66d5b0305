"""Gradient estimators: exact directional derivatives, unbiasedness, projection geometry, seeding, errors.

Statistical checks use fixed seeds and bounds derived from the estimator's variance. For g = (grad f . v) v with
a = grad f, component j has
    normal tangents:      Var g_j = |a|^2 + a_j^2        (E[v_i^2 v_j^2] = 1 + 2 delta_ij)
    rademacher tangents:  Var g_j = |a|^2 - a_j^2        (v_j^2 = 1 exactly)
so the mean of M estimates has standard error sqrt(Var g_j / M) per component; we allow Z = 4.5 standard errors
(two-sided tail 7e-6 per component), small enough that a biased estimator is caught (checked below).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fwdgrad import Backprop, ForwardGradient, cosine_similarity, estimate_module_grads
from fwdgrad.functional import cross_entropy
from fwdgrad.functions import Beale, Rosenbrock

Z = 4.5
DT = torch.float64


def _mlp_problem(seed: int = 0):
    """A small MLP with cross-entropy on random data: (loss_fn(params), params)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    x = torch.randn(11, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (11,), generator=g)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return (lambda p: cross_entropy(functional_call(model, p, (x,)), y)), params


PROBLEMS = {
    "beale": lambda: (Beale(), torch.tensor([1.0, 1.5], dtype=DT)),
    "rosenbrock": lambda: (Rosenbrock(), torch.tensor([-1.5, 2.0], dtype=DT)),
    "rosenbrock6": lambda: (Rosenbrock(dim=6), torch.linspace(-1, 1.5, 6, dtype=DT)),
    "mlp": _mlp_problem,
}


def _as_dict(p):
    return p if isinstance(p, dict) else {"": p}


def _true_grad(loss_fn, params):
    return Backprop()(loss_fn, params)[1]


def _flat(p) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in _as_dict(p).values()])


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_directional_derivative_equals_backprop_inner_product(name, k, dist):
    loss_fn, params = PROBLEMS[name]()
    est = ForwardGradient(num_tangents=k, distribution=dist, seed=3)
    p = _as_dict(params)
    single = not isinstance(params, dict)
    tangents = est.sample_tangents(p)
    loss, d = est.directional_derivatives(loss_fn, p, tangents, single)
    g = _flat(_true_grad(loss_fn, params))
    B = torch.cat([v.reshape(k, -1) for v in tangents.values()], dim=1)  # k x n
    torch.testing.assert_close(d, B @ g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, loss_fn(params).detach())


@pytest.mark.parametrize("name", ["beale", "mlp"])
def test_single_tangent_estimate_is_d_times_v(name):
    loss_fn, params = PROBLEMS[name]()
    _, est_grad = ForwardGradient(seed=7)(loss_fn, params)
    v = _flat(ForwardGradient(seed=7).sample_tangents(_as_dict(params)))  # same seed: same tangent
    g = _flat(_true_grad(loss_fn, params))
    torch.testing.assert_close(_flat(est_grad), (g @ v) * v, atol=1e-8, rtol=1e-8)


def _estimates(loss_fn, params, m: int, **kw) -> torch.Tensor:
    est = ForwardGradient(seed=11, **kw)
    return torch.stack([_flat(est(loss_fn, params)[1]) for _ in range(m)])


def _max_z(samples: torch.Tensor, a: torch.Tensor, var: torch.Tensor) -> float:
    se = (var / samples.shape[0]).sqrt()
    return float(((samples.mean(0) - a).abs() / se).max())


@pytest.mark.parametrize("name", ["rosenbrock6", "mlp"])
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_forward_gradient_is_unbiased(name, dist):
    loss_fn, params = PROBLEMS[name]()
    a = _flat(_true_grad(loss_fn, params))
    m = 4000
    samples = _estimates(loss_fn, params, m, distribution=dist)
    var = a.pow(2).sum() + (a.pow(2) if dist == "normal" else -a.pow(2))
    var = var.clamp_min(1e-12 * float(a.pow(2).sum()))
    assert _max_z(samples, a, var) < Z


def test_unbiasedness_check_catches_a_biased_estimator():
    # The same bound must reject "sum" with k = 2, whose expectation is 2 grad f (power of the test above).
    loss_fn, params = PROBLEMS["rosenbrock6"]()
    a = _flat(_true_grad(loss_fn, params))
    samples = _estimates(loss_fn, params, 4000, num_tangents=2, aggregation="sum")
    var = 2 * (a.pow(2).sum() + a.pow(2))  # variance of a sum of two independent single estimates
    assert _max_z(samples, a, var) > Z
    assert _max_z(samples, 2 * a, var) < Z


@pytest.mark.parametrize("k", [1, 4, 16])
def test_mean_aggregation_variance_falls_as_one_over_k(k):
    # E|g - a|^2 = (n + 1)|a|^2 / k for k normal tangents (sum over j of (|a|^2 + a_j^2) / k).
    loss_fn, params = PROBLEMS["mlp"]()
    a = _flat(_true_grad(loss_fn, params))
    n = a.numel()
    err = (_estimates(loss_fn, params, 1500, num_tangents=k) - a).pow(2).sum(1)
    expected = (n + 1) * float(a.pow(2).sum()) / k
    se = float(err.std()) / math.sqrt(err.numel())
    assert abs(float(err.mean()) - expected) < Z * se, (float(err.mean()), expected, se)


def test_projection_exact_when_k_equals_n_over_whole_parameter_vector():
    loss_fn, params = PROBLEMS["mlp"]()
    n = _flat(params).numel()  # 5*7+7 + 7*3+3 = 66 across four tensors
    _, g = ForwardGradient(num_tangents=n, aggregation="projection", seed=0)(loss_fn, params)
    torch.testing.assert_close(_flat(g), _flat(_true_grad(loss_fn, params)), atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_projection_residual_is_orthogonal_to_every_tangent(dist):
    loss_fn, params = PROBLEMS["mlp"]()
    k = 9
    est = ForwardGradient(num_tangents=k, aggregation="projection", distribution=dist, seed=5)
    _, g = est(loss_fn, params)
    tangents = ForwardGradient(num_tangents=k, distribution=dist, seed=5).sample_tangents(params)
    B = torch.cat([v.reshape(k, -1) for v in tangents.values()], dim=1)
    r = _flat(_true_grad(loss_fn, params)) - _flat(g)
    # <r, v_i> = 0 for every tangent over the concatenated vector (a per-tensor projection fails this).
    assert float((B @ r).abs().max()) < 1e-9 * float(r.norm() * B.norm(dim=1).max())
    # And g lies in the span: projecting it again changes nothing.
    coeff = torch.linalg.lstsq(B.T, _flat(g).unsqueeze(1)).solution
    torch.testing.assert_close((B.T @ coeff).squeeze(1), _flat(g), atol=1e-9, rtol=1e-9)


def test_projection_cosine_grows_with_k_as_sqrt_k_over_n():
    # For Gaussian tangents span(B) is a uniformly random k-subspace, so cos^2(P grad, grad) ~ Beta(k/2, (n-k)/2):
    # mean k/n, variance k(n-k) / (n^2 (n/2 + 1)).
    loss_fn, params = PROBLEMS["mlp"]()
    a = _true_grad(loss_fn, params)
    n = _flat(a).numel()
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
    runs = [[_flat(ForwardGradient(num_tangents=3, seed=s)(loss_fn, params)[1]) for _ in range(3)]
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


def test_module_helper_writes_grads_usable_by_torch_optim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ref = nn.functional.cross_entropy(model(x), y)
    ref.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = estimate_module_grads(Backprop(), model, lambda out: cross_entropy(out, y), x)
    torch.testing.assert_close(loss, ref.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    estimate_module_grads(ForwardGradient(seed=0), model, lambda out: cross_entropy(out, y), x)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


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
