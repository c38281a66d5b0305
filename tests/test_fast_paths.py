"""The fast engine's rules against the generic torch.func reference, through the estimator's backends.

Every fast path sits behind ``ForwardGradient(..., backend=...)``: ``backend="func"`` is ``torch.func.jvp``
(``vmap`` over it for k > 1), the reference; ``"fast"`` is :mod:`fwdgrad.engine`. With the same seed both see the
same tangents, so their directional derivatives must agree to rounding.

The estimator-level tests that were here moved with their code: tangent draws and rank-one statistics to
``test_tangents.py``, the chunked RNG to ``test_rng.py``, the rank-one Gram matrix to ``test_aggregation.py``,
regeneration and tangent groups to ``test_regeneration.py``, fallback, buffers, ``describe()`` to
``test_forward_gradient.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from estimator_problems import model_problem as _model_problem

from fwdgrad import ForwardGradient
from fwdgrad.engine import Unsupported, forward_tangents
from fwdgrad.experiments.global_optim.functions import Beale, Rosenbrock, StyblinskiTang

DT = torch.float64
DISTS = ["normal", "rademacher", "rank1"]


def _flat(d) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [1, 3])
def test_fast_directional_derivatives_match_torch_func(kind, dist, k):
    loss_fn, params = _model_problem(kind)
    fast = ForwardGradient(k, distribution=dist, seed=4, backend="fast")
    ref = ForwardGradient(k, distribution=dist, seed=4, backend="func")
    tangents = fast.draw(params).tangents  # rank1: the factors, as the estimator uses them
    loss_f, d_f = fast.directional_derivatives(loss_fn, params, tangents)
    loss_r, d_r = ref.directional_derivatives(loss_fn, params, tangents)
    assert d_f.shape == (k,)
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-6, atol=0)
    # relative to the size of the derivatives (float32 pass, different summation order)
    assert float((d_f - d_r).abs().max()) <= 1e-5 * float(d_r.abs().max())


@pytest.mark.parametrize("kind", ["mlp", "convnet", "logreg"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k,agg", [(1, "mean"), (1, "projection"), (4, "mean"), (4, "sum"), (4, "projection")])
def test_fast_estimates_equal_reference_estimates(kind, dist, k, agg):
    loss_fn, params = _model_problem(kind, DT)
    loss_f, g_f = ForwardGradient(k, agg, dist, seed=2, backend="fast")(loss_fn, params)
    loss_r, g_r = ForwardGradient(k, agg, dist, seed=2, backend="func")(loss_fn, params)
    torch.testing.assert_close(loss_f, loss_r)
    torch.testing.assert_close(_flat(g_f), _flat(g_r), rtol=1e-9, atol=1e-12)


def _zoo():
    """Small losses exercising every rule family (float64): (name, fn(p), params)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    x3, img = r(2, 3, 5), r(2, 4, 6, 6)
    return [
        ("linear_3d_input_tanh_sigmoid", lambda p: (torch.sigmoid(F.linear(torch.tanh(x3), p["w"], p["b"]))).sum(),
         {"w": r(4, 5), "b": r(4)}),
        ("grouped_strided_conv_avgpool_gelu", lambda p: F.gelu(F.avg_pool2d(
            F.conv2d(img, p["w"], p["b"], stride=2, padding=1, groups=2), 2)).pow(3).mean(),
         {"w": r(4, 2, 3, 3), "b": r(4)}),
        ("conv_same_padding_maxpool_silu", lambda p: F.silu(F.max_pool2d(
            F.conv2d(img, p["w"], None, padding="same"), 3, stride=2, padding=1)).mean(), {"w": r(3, 4, 3, 3)}),
        ("log_softmax_softmax_logsumexp", lambda p: (F.log_softmax(x3 @ p["w"], dim=-1) * F.softmax(
            p["w"].sum(0), dim=0)).sum() + torch.logsumexp(p["w"], dim=1).mean(), {"w": r(5, 4)}),
        ("torch_cross_entropy_and_dropout_eval", lambda p: F.cross_entropy(F.dropout(
            x3[0] @ p["w"], 0.3, training=False), torch.tensor([0, 2, 1])), {"w": r(5, 4)}),
        ("shapes_cat_transpose_permute_index", lambda p: (torch.cat([p["w"], p["w"].t()[:3, :3]], 0)
            .permute(1, 0)[1:, ::2].reshape(-1).unsqueeze(0).expand(2, -1).div(2.0 + p["w"][0, 0] ** 2)
            .clone().abs().sqrt().sum()), {"w": r(3, 3).abs() + 0.5}),
        # __rsub__, __rtruediv__ and __rpow__ (a Python number on the left) besides the tensor forms
        ("elementwise_arithmetic", lambda p: ((1.0 - p["v"]) * p["v"].exp() / (2.0 + p["v"].sin() ** 2)
            - 3.0 / (1.5 + p["v"].cos()) + 2.0 ** p["v"] + 0.5 ** (p["v"] * p["v"])
            + p["v"].square().neg().mean(0)).sum(), {"v": r(4)}),
        ("stack_amax_gather", lambda p: torch.stack([p["v"], 2 * p["v"]], 1).amax(1).sum()
            + p["v"].view(2, 2).gather(1, torch.tensor([[1], [0]])).sum(), {"v": r(4)}),
    ]


@pytest.mark.parametrize("name,fn,params", _zoo(), ids=[z[0] for z in _zoo()])
@pytest.mark.parametrize("dist", ["normal", "rank1"])
def test_op_rules_match_torch_func(name, fn, params, dist):
    fast = ForwardGradient(3, distribution=dist, seed=1, backend="auto")
    ref = ForwardGradient(3, distribution=dist, seed=1, backend="func")
    tangents = fast.draw(params).tangents
    loss_f, d_f = fast.directional_derivatives(fn, params, tangents)
    loss_r, d_r = ref.directional_derivatives(fn, params, tangents)
    torch.testing.assert_close(loss_f, loss_r)
    torch.testing.assert_close(d_f, d_r, rtol=1e-10, atol=1e-12)
    assert fast.fallback_reason is None  # every case stayed on the fast engine: the rules were compared


def test_an_op_without_a_rule_falls_back_visibly_with_the_same_numbers():
    fn, p = (lambda q: q["v"].square().log1p().sum()), {"v": torch.randn(4, dtype=DT)}  # log1p has no rule
    fast = ForwardGradient(3, seed=1, backend="auto")
    loss, g = fast(fn, p)
    assert "log1p" in fast.fallback_reason and "fallback" in fast.describe()["backend"]
    loss_r, g_r = ForwardGradient(3, seed=1, backend="func")(fn, p)
    torch.testing.assert_close(g["v"], g_r["v"])


@pytest.mark.parametrize("fn,x", [(Beale(), [1.0, 1.5]), (Rosenbrock(dim=5), [0.1, -0.3, 0.5, 1.2, 0.7]),
                                  (StyblinskiTang(dim=3), [0.5, -1.0, 2.0])])
def test_test_functions_stay_on_the_fast_path(fn, x):
    est = ForwardGradient(2, "projection", seed=0)
    _, g = est(fn, torch.tensor(x, dtype=DT))
    assert est.fallback_reason is None
    _, g_ref = ForwardGradient(2, "projection", seed=0, backend="func")(fn, torch.tensor(x, dtype=DT))
    torch.testing.assert_close(g, g_ref)


def _iadd(p):
    y = p["w"] * 2
    y += 1
    return y.sum()


def _setitem(p):
    y = p["w"] * 2
    y[0] = 0.0
    return y.sum()


@pytest.mark.parametrize("fn", [lambda p: p["w"].add_(1.0).sum(), _iadd, _setitem,
                                lambda p: F.relu(p["w"] * 1, inplace=False).exp_().sum()])
def test_in_place_ops_are_refused_before_they_run(fn):
    w = torch.randn(3)
    kept = w.clone()
    with pytest.raises(Unsupported, match="in-place op"):
        forward_tangents(fn, {"w": w}, {"w": torch.randn(1, 3)}, 1)
    assert torch.equal(w, kept)  # the caller's parameters are untouched
