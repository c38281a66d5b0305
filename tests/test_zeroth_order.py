"""ZerothOrder: finite-difference directional derivatives against backprop with derived bounds, unbiasedness up to
the finite-difference bias, parameters never written, agreement with the forward gradient, ops without forward-mode
AD, the memory of a pass, and the estimator in the training loop and global_optim.

The bounds. With g(t) = f(theta + t v) the central difference is
    D_c = (g(eps) - g(-eps)) / (2 eps) = g'(0) + (eps^2 / 6) g'''(0) + (eps^4 / 120) g^(5)(xi),   |xi| <= eps
(Taylor with the mean-value remainder), so |D_c - g'(0)| <= (eps^2 / 6) sup |g'''| and, one term further,
|D_c - g'(0) - (eps^2 / 6) g'''(0)| <= (eps^4 / 120) sup |g^(5)|. The forward difference is
D_f = g'(0) + (eps / 2) g''(0) + (eps^2 / 6) g'''(xi). Rounding adds at most 2R / (2 eps) (central) or 2R / eps
(forward), R a bound on the error of one computed loss value (derived in `_roundoff` for the test function).

The test function is f(W, b) = sum_{n,i} a_ni sin(z_ni), z = x W^T + b (one linear layer, so the perturbation's
row-block path runs; 37 columns and a 100-entry chunk, so rows and chunks are not aligned). Along v = (V, v_b)
z moves linearly: z(t) = z + t dz with dz = x V^T + v_b, hence g^(j)(t) = sum a sin^(j)(z + t dz) dz^j and
sup |g^(j)| <= M_j = sum |a| |dz|^j: explicit constants.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from estimator_problems import DT, PROBLEMS, Z, flat, model_problem, true_grad
from hydra.utils import instantiate
from mnist_helpers import TINY, compose_cfg
from torch import nn
from torch.func import functional_call, jvp

from fwdgrad import Backprop, ForwardGradient, ZerothOrder, aggregate, cosine_similarity, estimate_module_grads
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import TANGENT_DISTRIBUTIONS, ChunkedDistribution, ChunkedTangent, DirectionalEstimator
from fwdgrad.estimators.zeroth_order.perturbed_loss import Perturbation, PerturbedPass
from fwdgrad.estimators.tangents.rng import CHUNK, ChunkedRNG
from fwdgrad.estimators.tangents.seeded import chunk_reads_exact, entries_per_random
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.experiments.training import train

ROWS, COLS, BATCH = 29, 37, 5
SMALL_CHUNK = 100  # entries: rows of 37 straddle chunk boundaries


def sin_problem(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, COLS, generator=g, dtype=torch.float64)
    a = torch.randn(BATCH, ROWS, generator=g, dtype=torch.float64)
    params = {"w": 0.3 * torch.randn(ROWS, COLS, generator=g, dtype=torch.float64),
              "b": torch.randn(ROWS, generator=g, dtype=torch.float64)}
    x, a = x.to(dtype), a.to(dtype)
    params = {n: t.to(dtype) for n, t in params.items()}
    return (lambda p: (a * torch.sin(F.linear(x, p["w"], p["b"]))).sum()), params, x, a


def _directions(est: ZerothOrder, params, draw, i: int):
    """The dense tangent v_i (float64) and dz = x V^T + v_b."""
    return {n: t.dense()[i].double() if not isinstance(t, torch.Tensor) else t[i].double()
            for n, t in draw.tangents.items()}


def _roundoff(x, a, params, v, eps: float, u: float) -> float:
    """R: a bound on |computed f - f| at theta +- eps v for the sin problem (standard model, |delta| <= u per op).

    The perturbed entries come from one torch.add(theta, v, alpha=eps): within 2u (|theta| + eps |v|) of
    theta + eps v. A dot product of COLS terms plus the bias errs by at most gamma_{COLS+1} (|x| |W~| + |b~|),
    gamma_n = n u / (1 - n u); so |dz_computed| <= ((COLS + 4) u / (1 - (COLS + 4) u)) Z with
    Z = |x| (|W| + eps |V|)^T + |b| + eps |v_b|. sin then errs by that (|sin'| <= 1) plus 2u, the product
    a sin by u |a|, and the sum of m = BATCH * ROWS terms by gamma_m sum |a|.
    """
    x, a = x.double().abs(), a.double().abs()
    w, b = params["w"].double().abs(), params["b"].double().abs()
    zmag = x @ (w + eps * v["w"].abs()).T + b + eps * v["b"].abs()
    n1, m = COLS + 4, BATCH * ROWS
    gamma = lambda n: n * u / (1 - n * u)  # noqa: E731
    return float((a * (gamma(n1) * zmag + 3 * u)).sum() + gamma(m) * a.sum())


def _taylor(x, a, params, v):
    """g'(0) by backprop, and the exact g''(0), g'''(0) and bounds M_j = sum |a| |dz|^j (float64)."""
    x, a = x.double(), a.double()
    p = {n: t.double() for n, t in params.items()}
    z = F.linear(x, p["w"], p["b"])
    dz = F.linear(x, v["w"], v["b"])
    grad = Backprop()(lambda q: (a * torch.sin(F.linear(x, q["w"], q["b"]))).sum(), p)[1]
    g1 = float(sum((grad[n] * v[n]).sum() for n in grad))
    g2 = float(-(a * torch.sin(z) * dz**2).sum())
    g3 = float(-(a * torch.cos(z) * dz**3).sum())
    return g1, g2, g3, {j: float((a.abs() * dz.abs() ** j).sum()) for j in (2, 3, 5)}


# -- the finite difference against backprop ------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "rademacher", "rank1"])
@pytest.mark.parametrize("eps", [1e-3, 3e-3])
def test_central_difference_is_the_derivative_plus_the_predicted_eps_squared_term(dist, eps):
    loss_fn, params, x, a = sin_problem(DT)
    est = ZerothOrder(3, eps, dist, seed=1, chunk_entries=SMALL_CHUNK)
    draw = est.draw(params)
    _, d = est.directional_derivatives(loss_fn, params, draw.tangents)
    terms, tolerances = [], []
    for i in range(3):
        v = _directions(est, params, draw, i)
        g1, _, g3, m = _taylor(x, a, params, v)
        rounding = _roundoff(x, a, params, v, eps, 2.0**-53) / eps
        err = float(d[i]) - g1
        assert abs(err) <= eps**2 / 6 * m[3] + rounding  # the O(eps^2) bound
        # and the error *is* the eps^2 term: what is left is O(eps^4)
        assert abs(err - eps**2 / 6 * g3) <= eps**4 / 120 * m[5] + rounding
        terms.append(abs(eps**2 / 6 * g3))
        tolerances.append(eps**4 / 120 * m[5] + rounding)
    assert sum(terms) > 10 * sum(tolerances)  # the eps^2 term is well above the tolerance: the check has power


def test_forward_difference_is_the_derivative_plus_the_predicted_eps_term():
    loss_fn, params, x, a = sin_problem(DT)
    eps = 1e-4
    est = ZerothOrder(2, eps, seed=2, difference="forward", chunk_entries=SMALL_CHUNK)
    draw = est.draw(params)
    loss, d = est.directional_derivatives(loss_fn, params, draw.tangents)
    assert torch.equal(loss, loss_fn(params))  # f(theta) itself: the forward difference evaluates it
    for i in range(2):
        g1, g2, _, m = _taylor(x, a, params, _directions(est, params, draw, i))
        rounding = 2 * _roundoff(x, a, params, _directions(est, params, draw, i), eps, 2.0**-53) / eps
        assert abs(float(d[i]) - g1 - eps / 2 * g2) <= eps**2 / 6 * m[3] + rounding
        assert abs(eps / 2 * g2) > 10 * (eps**2 / 6 * m[3] + rounding)  # the check has power


@pytest.mark.parametrize("eps", [1e-4, 1e-3, 1e-2, 1e-1])
def test_float32_error_stays_within_truncation_plus_roundoff(eps):
    # float32 parameters and loss; the reference is backprop in float64 at the same (float32) point.
    loss_fn, params, x, a = sin_problem(torch.float32)
    est = ZerothOrder(4, eps, seed=3, chunk_entries=SMALL_CHUNK)
    draw = est.draw(params)
    _, d = est.directional_derivatives(loss_fn, params, draw.tangents)
    assert d.dtype == torch.float32
    for i in range(4):
        v = _directions(est, params, draw, i)
        g1, _, _, m = _taylor(x, a, params, v)
        bound = eps**2 / 6 * m[3] + _roundoff(x, a, params, v, eps, 2.0**-24) / eps
        assert abs(float(d[i]) - g1) <= bound


def test_error_on_a_real_model_is_the_third_derivative_term():
    # The tanh MLP of the shared problems (float64): g'''(0) exactly by nested forward-mode AD; the central
    # difference's error must be (eps^2 / 6) g'''(0) up to O(eps^4) (relative eps^2 g^(5) / (20 g''') ~ 1e-8 here,
    # allowed 1e-3) and float64 rounding (|f| ~ 1: 1e-16 / eps).
    loss_fn, params = PROBLEMS["mlp"]()
    eps = 1e-3
    est = ZerothOrder(3, eps, seed=4)
    draw = est.draw(params)
    _, d = est.directional_derivatives(loss_fn, params, draw.tangents)
    for i in range(3):
        v = {n: t.dense()[i] for n, t in draw.tangents.items()}

        def g(t):
            return loss_fn({n: params[n] + t * v[n] for n in params})

        def dg(t):
            return jvp(g, (t,), (torch.ones((), dtype=DT),))[1]

        def d2g(t):
            return jvp(dg, (t,), (torch.ones((), dtype=DT),))[1]

        t0 = torch.zeros((), dtype=DT)
        g1 = float(dg(t0))
        g3 = float(jvp(d2g, (t0,), (torch.ones((), dtype=DT),))[1])
        term = eps**2 / 6 * g3
        assert abs(float(d[i]) - g1 - term) <= 1e-3 * abs(term) + 64 * 2.0**-53 / eps
        assert abs(term) > 1e4 * 64 * 2.0**-53 / eps  # the eps^2 term is far above the rounding allowance


# -- unbiased up to the finite-difference bias -------------------------------------------------------------------
def _cubic_problem():
    """f = sum_i c_i z_i^3 / 6 + sum_i l_i z_i, z = W x + b (one example): D^3 f[v,v,v] = sum_i c_i dz_i^3."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, generator=g, dtype=DT)
    c, lin = torch.randn(4, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    params = {"w": torch.randn(4, 3, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}

    def loss(p):
        z = F.linear(x, p["w"], p["b"])
        return (c * z**3 / 6 + lin * z).sum()

    return loss, params, x, c


def _cubic_bias(x, c, eps: float) -> torch.Tensor:
    """E[g] - grad f for normal tangents and mean aggregation, exactly.

    The central difference of a cubic is exact up to (eps^2 / 6) D^3 f[v,v,v] = (eps^2 / 6) sum_i c_i dz_i^3 with
    dz_i = <G_i, v> (G_i = dz_i/dtheta: x in row i of W, 1 at b_i). For Gaussian v (Isserlis)
    E[dz_i^3 v_j] = 3 |G_i|^2 G_ij, so the bias is (eps^2 / 2) sum_i c_i |G_i|^2 G_i, i.e.
    (eps^2 / 2) c_i (|x|^2 + 1) x_k at W_ik and (eps^2 / 2) c_i (|x|^2 + 1) at b_i.
    """
    s2 = float(x.pow(2).sum()) + 1
    return torch.cat([(eps**2 / 2 * s2 * c[:, None] * x[None, :]).reshape(-1), eps**2 / 2 * s2 * c])


def _max_z(samples: torch.Tensor, mean: torch.Tensor) -> float:
    # Standard error from the draws: the eps term's share of Var g has no short closed form; with 4000 draws the
    # estimated standard error is within a few percent of the true one.
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return float(((samples.mean(0) - mean).abs() / se).max())


@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_estimate_is_unbiased_up_to_the_exact_finite_difference_bias(eps):
    loss_fn, params, x, c = _cubic_problem()
    a = flat(true_grad(loss_fn, params))
    est = ZerothOrder(1, eps, seed=6, exact_loss=False)
    samples = torch.stack([flat(est(loss_fn, params)[1]) for _ in range(4000)])
    bias = _cubic_bias(x, c, eps)
    assert _max_z(samples, a + bias) < Z
    if eps == 0.5:  # the bias is real: ignoring it fails the same test (power)
        assert _max_z(samples, a) > Z
    else:  # and negligible at eps = 1e-2 (1e-4 relative)
        assert _max_z(samples, a) < Z


# -- parameters are never written ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dist,k,difference", [("normal", 1, "central"), ("rademacher", 3, "forward"),
                                               ("rank1", 2, "central")])
def test_parameters_are_bit_identical_after_a_step(dist, k, difference):
    loss_fn, params = model_problem("mlp", torch.float32)
    before = {n: t.clone() for n, t in params.items()}
    ZerothOrder(k, 1e-3, dist, seed=0, difference=difference)(loss_fn, params)
    for n in params:
        assert torch.equal(params[n], before[n])


def test_parameters_are_bit_identical_when_the_loss_raises_mid_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    before = {n: t.clone() for n, t in params.items()}
    calls = {"n": 0}

    def boom(module, inputs, output):  # after the first layer ran, in the second (perturbed) pass
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("loss failed mid-pass")

    handle = model[0].register_forward_hook(boom)
    est = ZerothOrder(2, 1e-3, seed=0)
    with pytest.raises(RuntimeError, match="loss failed mid-pass"):
        est(lambda p: cross_entropy(functional_call(model, p, (x,)), y), params)
    handle.remove()
    assert torch._C._len_torch_function_stack() == 0  # the perturbation mode was left
    for n in params:
        assert torch.equal(params[n], before[n])
    est(lambda p: cross_entropy(functional_call(model, p, (x,)), y), params)  # usable afterwards


def test_float32_parameters_come_back_bit_for_bit_where_in_place_perturbation_would_not():
    # Why the parameters are perturbed at use time: MeZO's in-place theta += eps z, -= 2 eps z, += eps z changes
    # the last bits of many float32 entries; ZerothOrder's steps (central and one-sided) leave theta as it was.
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(100_000, generator=g)
    z = torch.randn(100_000, generator=g)
    w = theta.clone()
    w.add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    assert int((w != theta).sum()) > 1000
    for difference in ("central", "forward"):
        params = {"w": theta.clone()}
        ZerothOrder(2, 1e-3, seed=0, difference=difference)(lambda p: (p["w"] * p["w"]).sum(), params)
        assert torch.equal(params["w"], theta)


# -- the same tangents as the forward gradient -------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "rademacher", "counter_normal"])
def test_with_the_forward_gradients_chunk_the_tangents_are_the_forward_gradients(dist):
    loss_fn, params = model_problem("mlp", DT)
    zo = ZerothOrder(3, 1e-3, dist, seed=7,
                     chunk_entries=CHUNK * entries_per_random(TANGENT_DISTRIBUTIONS[dist], torch.float32))
    assert zo.rng.chunk == CHUNK  # the forward gradient's chunk of random numbers
    fg = ForwardGradient(3, distribution=dist, seed=7)
    for _ in range(2):  # the second step too: both consume their generators alike
        zo_tangents = zo.draw(params).dense()
        fg_tangents = fg.sample_tangents(params)
        for n in params:
            assert torch.equal(zo_tangents[n], fg_tangents[n])


@pytest.mark.parametrize("dist,agg", [("normal", "mean"), ("rademacher", "sum"), ("normal", "projection"),
                                      ("rank1", "mean")])
def test_zeroth_order_and_forward_gradient_agree_up_to_the_eps_bias(dist, agg):
    # Same seed, k and tangents (the forward gradient given the zeroth-order estimator's RNG chunk): per tangent
    # |d_zo - d_fg| <= (eps^2 / 6) M_3 + 2R / (2 eps) (the bounds above), and g = B c(d) in both.
    loss_fn, params, x, a = sin_problem(DT)
    eps, k = 1e-3, 3
    zo = ZerothOrder(k, eps, dist, agg, seed=8, chunk_entries=SMALL_CHUNK)
    fg = ForwardGradient(k, agg, dist, seed=8, backend="func")
    fg.rng = ChunkedRNG(zo.rng.chunk)
    draw = zo.draw(params)
    fg_draw = fg.draw(params)
    _, d_zo = zo.directional_derivatives(loss_fn, params, draw.tangents)
    _, d_fg = fg.directional_derivatives(loss_fn, params, fg_draw.tangents)
    for i in range(k):
        v = _directions(zo, params, draw, i)
        _, _, _, m = _taylor(x, a, params, v)
        assert abs(float(d_zo[i] - d_fg[i])) <= eps**2 / 6 * m[3] + _roundoff(x, a, params, v, eps, 2.0**-53) / eps
    # every aggregation here is linear in d (c = d/k, d, (B^T B)^{-1} d), so the estimates differ by exactly the
    # aggregation of the derivatives' difference
    g_zo, g_fg = flat(zo.estimate(draw, d_zo)), flat(fg.estimate(fg_draw, d_fg))
    torch.testing.assert_close(g_zo - g_fg, flat(aggregate(agg, draw.tangents, d_zo - d_fg)), rtol=1e-6,
                               atol=1e-12 * float(g_fg.norm()))
    assert cosine_similarity(g_zo, g_fg) > 0.999


def test_analysis_style_reuse_of_forward_gradient_tangents():
    # ZerothOrder accepts tangents it did not draw (dense, regenerated, rank-one): e.g. a forward gradient's.
    loss_fn, params = PROBLEMS["mlp"]()
    fg = ForwardGradient(2, seed=9, regenerate_tangents=True)
    draw = fg.draw(params)
    _, d_fg = fg.directional_derivatives(loss_fn, params, draw.tangents)
    _, d_zo = ZerothOrder(2, 1e-4, seed=0).directional_derivatives(loss_fn, params, draw.tangents)
    torch.testing.assert_close(d_zo, d_fg, rtol=1e-6, atol=1e-9)


# -- the parts ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(n for n, d in TANGENT_DISTRIBUTIONS.items()
                                        if isinstance(d, ChunkedDistribution) and d.dense_blocks))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_dense_chunked_distribution_regenerates_chunk_by_chunk(name, dtype):
    dist = TANGENT_DISTRIBUTIONS[name]
    for chunk in (3, 64, 1000):
        assert chunk_reads_exact(dist, dtype, torch.device("cpu"), chunk)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_chunked_combine_equals_the_dense_combination(k, dist):
    _, params = model_problem("mlp", torch.float32)
    est = ZerothOrder(k, distribution=dist, seed=1, chunk_entries=96)
    draw = est.draw(params)
    assert all(isinstance(t, ChunkedTangent) for t in draw.tangents.values())
    c = torch.randn(k, dtype=torch.float64)
    for t in draw.tangents.values():
        ref = torch.tensordot(c.float(), t.dense(), dims=1)
        torch.testing.assert_close(t.combine(c), ref, rtol=1e-5, atol=1e-5)
        # a reader over consecutive, misaligned ranges gives the dense entries
        reader, dense = t.reader(), t.dense().reshape(-1)
        cuts = sorted({min(c, dense.numel()) for c in (0, 5, 150, 151, dense.numel())})
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            assert torch.equal(reader.read(lo, hi, torch.empty(hi - lo)), dense[lo:hi])


def test_metadata_reads_see_the_parameter_and_other_ops_a_materialised_copy():
    w = torch.randn(4, 3)
    v = torch.randn(1, 4, 3)
    mode = PerturbedPass({"w": Perturbation(w, v, 0, 0.5)})
    with mode:
        shape, dim, n, dtype = w.shape, w.dim(), len(w), w.dtype
    assert (shape, dim, n, dtype) == ((4, 3), 2, 4, torch.float32) and not mode.materialised
    with mode:
        s = w.sum()
        y = F.linear(torch.ones(2, 3), w)
    assert mode.materialised == {"sum"} and mode.seen == {"w"}
    torch.testing.assert_close(s, (w + 0.5 * v[0]).sum())
    torch.testing.assert_close(y, F.linear(torch.ones(2, 3), w + 0.5 * v[0]))


def test_operations_without_a_row_block_path_are_logged_once(caplog):
    loss_fn, params = model_problem("convnet", torch.float32)
    est = ZerothOrder(1, seed=0)
    with caplog.at_level(logging.INFO, logger="fwdgrad.estimators"):
        est(loss_fn, params)
        est(loss_fn, params)
    assert caplog.text.count("conv2d reads a whole parameter") == 1


# -- what only finite differences can do ---------------------------------------------------------------------------
class _Piecewise(torch.autograd.Function):
    """A continuous piecewise-linear activation by table lookup (torch.bucketize): a backward, no jvp."""

    knots = torch.tensor([-1.0, 0.0, 1.0], dtype=DT)
    slopes = torch.tensor([0.1, 0.5, 1.5, 0.2], dtype=DT)

    @staticmethod
    def forward(z):
        k, s = _Piecewise.knots, _Piecewise.slopes
        start = torch.cat([torch.zeros(1, dtype=DT), torch.cumsum(s[1:-1] * torch.diff(k), 0)])  # f at knots
        idx = torch.bucketize(z, k)
        base = torch.cat([start[:1], start])[idx]
        left = torch.cat([k[:1], k])[idx]
        return base + s[idx] * (z - left)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * _Piecewise.slopes[torch.bucketize(z, _Piecewise.knots)]


def test_works_for_an_op_without_forward_mode_ad():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 5, generator=g, dtype=DT)
    a = torch.randn(6, 4, generator=g, dtype=DT)
    params = {"w": torch.randn(4, 5, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}

    def loss_fn(p):
        return (a * _Piecewise.apply(F.linear(x, p["w"], p["b"]))).sum()

    with pytest.raises(ConfigError):  # forward mode has no rule: the custom Function has no jvp
        ForwardGradient(seed=0)(loss_fn, params)
    eps = 1e-6
    est = ZerothOrder(3, eps, seed=0)
    draw = est.draw(params)
    _, d = est.directional_derivatives(loss_fn, params, draw.tangents)
    grad = flat(true_grad(loss_fn, params))
    z = F.linear(x, params["w"], params["b"])
    for i in range(3):
        v = {n: t.dense()[i] for n, t in draw.tangents.items()}
        dz = F.linear(x, v["w"], v["b"])
        # no knot between z - eps dz and z + eps dz: f is linear along the segment, the difference exact
        assert torch.equal(torch.bucketize(z + eps * dz, _Piecewise.knots),
                           torch.bucketize(z - eps * dz, _Piecewise.knots))
        ref = float(grad @ flat(v))
        assert abs(float(d[i]) - ref) <= 1e-7 * (abs(ref) + float(a.abs().sum()))  # float64 rounding / eps


def test_every_pass_sees_the_same_dropout_mask():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50, generator=g, dtype=DT)
    w = torch.randn(50, generator=g, dtype=DT)
    loss_fn = lambda p: F.dropout(x * p, 0.5).sum()  # noqa: E731  (linear in p for a fixed mask)
    torch.manual_seed(123)
    est = ZerothOrder(2, 1e-3, seed=0)
    draw = est.draw({"": w})
    _, d = est.directional_derivatives(loss_fn, {"": w}, draw.tangents, single=True)
    after = torch.get_rng_state()
    torch.manual_seed(123)
    mask_grad = true_grad(loss_fn, w)  # backprop with the mask the first pass drew
    assert torch.equal(torch.get_rng_state(), after)  # the global generator advanced by one pass, as one step
    for i in range(2):
        torch.testing.assert_close(d[i], mask_grad @ draw.tangents[""].dense()[i], rtol=1e-9, atol=1e-9)


def test_a_parameter_the_perturbation_cannot_see_is_an_error_and_an_unused_one_is_fine():
    x = torch.randn(5, dtype=DT)
    params = {"w": torch.randn(5, dtype=DT), "b": torch.randn(1, dtype=DT), "unused": torch.randn(3, dtype=DT)}

    def hidden(p):  # the product runs on another thread, where the (thread-local) mode is not active
        out = {}
        th = threading.Thread(target=lambda: out.update(v=(p["w"] * x).sum()))
        th.start()
        th.join()
        return out["v"] + p["b"].sum()

    with pytest.raises(ConfigError, match="parameter\\(s\\) 'w' reach the loss through an operation"):
        ZerothOrder(seed=0)(hidden, params)
    loss, g = ZerothOrder(seed=0)(lambda p: (p["w"] * x).sum() + p["b"].sum(), params)
    assert set(g) == set(params)


# -- the estimator interface ----------------------------------------------------------------------------------------
def test_public_stages_compose_to_the_call_and_seeds_reproduce():
    loss_fn, params = model_problem("mlp", DT)
    whole, staged = ZerothOrder(3, seed=4), ZerothOrder(3, seed=4)
    assert isinstance(staged, DirectionalEstimator)
    for _ in range(2):
        loss, g = whole(loss_fn, params)
        draw = staged.draw(params)
        loss_s, d = staged.directional_derivatives(loss_fn, params, draw.tangents)
        g_s = staged.estimate(draw, d)
        assert torch.equal(loss, loss_s) and all(torch.equal(g[n], g_s[n]) for n in g)
    assert not torch.equal(flat(ZerothOrder(3, seed=5)(loss_fn, params)[1]), flat(g))


def test_reported_loss_is_f_theta_unless_asked_for_the_midpoint():
    loss_fn, params = PROBLEMS["mlp"]()
    assert torch.equal(ZerothOrder(2, 1e-2, seed=0)(loss_fn, params)[0], loss_fn(params))
    mid = ZerothOrder(2, 1e-2, seed=0, exact_loss=False)(loss_fn, params)[0]
    assert 0 < abs(float(mid - loss_fn(params))) < 1e-2  # f + (eps^2 / 2) <v, H v>: O(eps^2 n)


def test_single_tensor_params_and_module_helper():
    f = PROBLEMS["rosenbrock"]()[0]
    loss, g = ZerothOrder(2, 1e-4, seed=0, aggregation="projection")(f, torch.zeros(2, dtype=DT))
    torch.testing.assert_close(g, torch.tensor([-2.0, 0.0], dtype=DT), rtol=1e-6, atol=1e-6)  # k = n: exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    estimate_module_grads(ZerothOrder(), model, lambda o: cross_entropy(o, y), x)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    ({"num_tangents": 0}, "num_tangents must be an integer >= 1"),
    ({"epsilon": 0.0}, "epsilon must be a finite number > 0"),
    ({"epsilon": float("inf")}, "epsilon must be a finite number > 0"),
    ({"difference": "backward"}, "difference must be one of central, forward, got 'backward'"),
    ({"chunk_entries": 0}, "chunk_entries must be an integer >= 1"),
    ({"aggregation": "median"}, "unknown aggregation 'median'"),
    ({"distribution": "cauchy"}, "unknown tangent distribution 'cauchy'"),
])
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ZerothOrder(**kwargs)


def test_describe():
    d = ZerothOrder().describe()
    assert d == {"estimator": "ZerothOrder", "num_tangents": 1, "epsilon": 1e-3, "difference": "central",
                 "aggregation": "mean", "distribution": "normal", "seed": 0}
    d = ZerothOrder(exact_loss=False, chunk_entries=1024).describe()
    assert d["exact_loss"] is False and d["chunk_entries"] == 1024



@pytest.mark.parametrize("difference,passes", [("central", 2 * 3 + 1), ("forward", 3 + 1)])
def test_config_selects_the_difference_and_its_pass_count(difference, passes):
    # the real Hydra config: central costs 2k + 1 loss evaluations (with the exact loss), one-sided k + 1
    cfg = compose_cfg("mnist_fwdgrad", ["gradient=zeroth_order", "gradient.num_tangents=3",
                                        f"gradient.difference={difference}"])
    est = instantiate(cfg.gradient)
    assert isinstance(est, ZerothOrder) and est.difference == difference and est.chunk_entries == 1 << 16
    loss_fn, params = model_problem("mlp", torch.float32)
    calls = []
    est(lambda p: calls.append(1) or loss_fn(p), params)
    # before its first step the estimator checks once what finite differences cannot see: a recording pass with
    # gradients on, and a second one where a detach (here the cross-entropy's max shift) must be weighed
    assert len(calls) == passes + 2
    calls.clear()
    est(lambda p: calls.append(1) or loss_fn(p), params)
    assert len(calls) == passes

# -- every script selects it: gradient=zeroth_order ------------------------------------------------------------------
def test_one_short_epoch_of_the_convnet(tmp_path):
    # convolutions get a materialised perturbed weight; linear layers (logreg, MLP) the row-block path, trained in
    # test_mnist_loop_trains_like_the_forward_gradient_with_the_same_seed
    cfg = compose_cfg("mnist_fwdgrad", [*TINY, "gradient=zeroth_order", "model=conv", "dataset.limit_train=96",
                                        "dataset.limit_test=64", "dataset.batch_size=32", "log_every=2"])
    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, input_shape=[1, 8, 8], num_classes=10, _convert_="all").state_dict()
    m = train(cfg, tmp_path)
    assert m["stopped"] == "completed" and m["steps"] == 3 and m["estimator"]["estimator"] == "ZerothOrder"
    final = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    assert any(not torch.equal(final[k], init[k]) for k in init)


def test_mnist_loop_trains_like_the_forward_gradient_with_the_same_seed(tmp_path):
    # Every tangent block of this MLP fits in one seeded chunk of either estimator, so the same seed draws the same
    # tangents: the two runs differ only by the finite-difference error of each step's derivatives.
    common = [*TINY, "model=mlp", "model.hidden_sizes=[32]", "optimization=adam", "optimization.learning_rate=1e-2",
              "optimization/scheduler=constant", "optimization.epochs=2", "gradient.num_tangents=4", "log_every=10",
              "threads=1"]
    zo = train(compose_cfg("mnist_fwdgrad", [*common, "gradient=zeroth_order"]), tmp_path / "zo")
    fg = train(compose_cfg("mnist_fwdgrad", [*common, "gradient=forward"]), tmp_path / "fg")
    assert zo["final_train_loss"] < math.log(10) - 0.05  # below chance: it trains
    assert abs(zo["final_train_loss"] - fg["final_train_loss"]) < 0.01
    assert abs(zo["final_test_accuracy"] - fg["final_test_accuracy"]) <= 0.02


def test_global_optim_runs_zeroth_order_beside_the_forward_gradient(tmp_path):
    from fwdgrad.experiments.global_optim.optimize import run_global_optim

    cfg = compose_cfg("global_optim", ["function=rosenbrock", "iterations=300", "gradient=zeroth_order",
                                       "gradient@baseline=forward"])
    runs = run_global_optim(cfg, output_dir=tmp_path)["estimators"]
    zo, fg = runs["zeroth_order_k1_0.001_central_mean_normal"], runs["forward_gradient_k1_mean_normal"]
    assert not zo["diverged"] and zo["iterations_run"] == 300
    # same seed, same tangents (2-D: one chunk): the same path up to the eps^2 bias of each step
    assert max(abs(a - b) for a, b in zip(zo["final_point"], fg["final_point"])) < 1e-3


def test_approx_quality_puts_zeroth_order_beside_the_forward_gradient(tmp_path):
    from fwdgrad.experiments.quality.analysis import run_approx_quality

    cfg = compose_cfg("approx_quality", ["num_samples=5", "source.dims=[40]", "num_tangents=[1,8]"])
    run_approx_quality(cfg, output_dir=tmp_path)
    df = pd.read_csv(tmp_path / "approx_quality.csv")
    for col in ("zo_cos_mean", "zo_cos_std", "zo_fg_cos_mean", "zo_fg_cos_min"):
        assert df[col].notna().all(), col
    # the linear loss has no truncation error: ZO and FG differ by float32 rounding of u |f| / eps per derivative
    assert float(df["zo_fg_cos_min"].min()) > 1 - 1e-4
    np.testing.assert_allclose(df["zo_cos_mean"], df["cos_mean"], atol=1e-3)
    assert (tmp_path / "cosine_vs_k.png").stat().st_size > 10_000
    off = compose_cfg("approx_quality", ["num_samples=3", "source.dims=[12]", "num_tangents=[1]",
                                         "~gradient@zeroth_order"])
    run_approx_quality(off, output_dir=tmp_path / "off")
    assert "zo_cos_mean" not in pd.read_csv(tmp_path / "off" / "approx_quality.csv")


# -- memory: about one no-grad forward pass -------------------------------------------------------------------------
def test_passes_peak_within_ten_percent_of_a_no_grad_forward_pass():
    # A scaled-down deep MLP (make bench checks 32 x 1024 at batch 2048): activations of 1 MiB, so the no-grad
    # pass holds 2 MiB (a layer's input and output); the perturbation adds one row block of about chunk_entries.
    from fwdgrad.perf.memory import tensor_peak_mib
    from fwdgrad.nn.models import MLP

    torch.manual_seed(0)
    model = MLP((256,), 10, [256] * 4)
    x, y = torch.randn(1024, 256), torch.randint(0, 10, (1024,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = ZerothOrder(1, seed=0, chunk_entries=1 << 13)

    def loss_fn(p):
        return cross_entropy(functional_call(model, p, (x,)), y)

    def forward():
        with torch.no_grad():
            loss_fn(params)

    def passes():
        draw = est.draw(params)
        est.directional_derivatives(loss_fn, params, draw.tangents)

    passes()  # first call: lazy initialisation
    fwd, zo = tensor_peak_mib(forward), tensor_peak_mib(passes)
    assert fwd == pytest.approx(2.0, rel=0.05) and zo <= 1.1 * fwd, (zo, fwd)
    grad_mib = sum(p.numel() for p in params.values()) * 4 / 2**20
    step = tensor_peak_mib(lambda: est(loss_fn, params))  # + the n-float gradient it returns
    assert step <= 1.1 * max(fwd, grad_mib), (step, fwd, grad_mib)


def test_running_statistics_from_a_perturbed_pass_are_announced(caplog):
    # Central differences without exact_loss never evaluate f(theta): batch norm's running statistics then come
    # from the theta + eps v pass. That is said once; with exact_loss (default) they are backprop's exactly.
    from torch import nn

    from fwdgrad import Backprop, estimate_module_grads
    from fwdgrad.nn.functional import cross_entropy

    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))

    def step(est):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        for _ in range(2):
            estimate_module_grads(est, model, lambda out: cross_entropy(out, y), x)
        return model[1].running_mean.clone()

    with caplog.at_level("WARNING"):
        exact, reference = step(ZerothOrder(epsilon=0.1, seed=3)), step(Backprop())
    assert "running statistics" not in caplog.text
    torch.testing.assert_close(exact, reference, rtol=0, atol=0)
    with caplog.at_level("WARNING"):
        perturbed = step(ZerothOrder(epsilon=0.1, seed=3, exact_loss=False))
    assert caplog.text.count("running statistics are updated from a perturbed pass") == 1  # once, not per step
    assert not torch.allclose(perturbed, reference)  # what the warning is about: O(eps) off
