"""The fast paths against the generic torch.func reference, and the rank-one distribution's statistics.

Every fast path sits behind ``ForwardGradient(..., backend=...)``: ``backend="func"`` is ``torch.func.jvp``
(``vmap`` over it for k > 1), the reference; ``"fast"`` is :mod:`fwdgrad.engine`. With the same seed both see the
same tangents, so their directional derivatives must agree to rounding.

Statistics: for rank-one tangents the per-component variance of g = d u v^T is derived in
:mod:`fwdgrad.structured` (Var g_ij = |a|^2 + 2|A_i,:|^2 + 2|A_:,j|^2 + 3 A_ij^2); the unbiasedness test allows
Z = 4.5 standard errors per component, as in ``test_estimators.py``.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fwdgrad.estimators as estimators
from fwdgrad import Backprop, ForwardGradient, estimate_module_grads
from fwdgrad.engine import RankOne, Unsupported, forward_tangents
from fwdgrad.functional import cross_entropy
from fwdgrad.functions import Beale, Rosenbrock, StyblinskiTang
from fwdgrad.models import MLP, ConvNet, LogisticRegression
from fwdgrad.structured import component_variance, total_variance
from test_estimators import _mlp_problem as _small_mlp  # the same seeded 5-7-3 MLP problem

Z = 4.5
DT = torch.float64
DISTS = ["normal", "rademacher", "rank1"]


def _model_problem(kind: str, dtype=torch.float32, batch: int = 6):
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = MLP((1, 8, 8), 5, (24, 16)), (1, 8, 8)
    elif kind == "convnet":
        model, shape = ConvNet((1, 8, 8), 5, channels=3, hidden_size=12), (1, 8, 8)
    else:
        model, shape = LogisticRegression((3, 4), 4), (3, 4)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (batch,), generator=g)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return (lambda p: cross_entropy(functional_call(model, p, (x,)), y)), params


def _flat(d) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("k", [1, 3])
def test_fast_directional_derivatives_match_torch_func(kind, dist, k):
    loss_fn, params = _model_problem(kind)
    fast = ForwardGradient(k, distribution=dist, seed=4, backend="fast")
    ref = ForwardGradient(k, distribution=dist, seed=4, backend="func")
    tangents = fast._draw(params, reuse=False).tangents  # rank1: the factors, as the estimator uses them
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
        ("elementwise_arithmetic", lambda p: ((1.0 - p["v"]) * p["v"].exp() / (2.0 + p["v"].sin() ** 2)
            - 3.0 / (1.5 + p["v"].cos()) + 2.0 ** p["v"] + p["v"].square().log1p().neg().mean(0)).sum(),
         {"v": r(4)}),
        ("stack_amax_gather", lambda p: torch.stack([p["v"], 2 * p["v"]], 1).amax(1).sum()
            + p["v"].view(2, 2).gather(1, torch.tensor([[1], [0]])).sum(), {"v": r(4)}),
    ]


@pytest.mark.parametrize("name,fn,params", _zoo(), ids=[z[0] for z in _zoo()])
@pytest.mark.parametrize("dist", ["normal", "rank1"])
def test_op_rules_match_torch_func(name, fn, params, dist):
    fast = ForwardGradient(3, distribution=dist, seed=1, backend="auto")
    ref = ForwardGradient(3, distribution=dist, seed=1, backend="func")
    tangents = fast._draw(params, reuse=False).tangents
    loss_f, d_f = fast.directional_derivatives(fn, params, tangents)
    loss_r, d_r = ref.directional_derivatives(fn, params, tangents)
    torch.testing.assert_close(loss_f, loss_r)
    torch.testing.assert_close(d_f, d_r, rtol=1e-10, atol=1e-12)
    # log1p has no rule: that case must have fallen back; every other case must have stayed on the fast path
    assert (fast._fast_unsupported is not None) == (name == "elementwise_arithmetic")


@pytest.mark.parametrize("fn,x", [(Beale(), [1.0, 1.5]), (Rosenbrock(dim=5), [0.1, -0.3, 0.5, 1.2, 0.7]),
                                  (StyblinskiTang(dim=3), [0.5, -1.0, 2.0])])
def test_test_functions_stay_on_the_fast_path(fn, x):
    est = ForwardGradient(2, "projection", seed=0)
    _, g = est(fn, torch.tensor(x, dtype=DT))
    assert est._fast_unsupported is None
    _, g_ref = ForwardGradient(2, "projection", seed=0, backend="func")(fn, torch.tensor(x, dtype=DT))
    torch.testing.assert_close(g, g_ref)


def test_unsupported_op_falls_back_once_with_a_warning_or_raises_with_fast(caplog):
    x = torch.randn(4, 5, dtype=DT)
    loss_fn = lambda p: F.layer_norm(x @ p["w"], (3,)).pow(2).sum()  # noqa: E731  (no layer_norm rule)
    params = {"w": torch.randn(5, 3, dtype=DT)}
    est = ForwardGradient(2, seed=0)
    with caplog.at_level(logging.WARNING, logger="fwdgrad.estimators"):
        _, g1 = est(loss_fn, params)
        _, g2 = est(loss_fn, params)
    assert caplog.text.count("fast path unavailable") == 1 and "layer_norm" in caplog.text
    ref = ForwardGradient(2, seed=0, backend="func")
    torch.testing.assert_close(g1["w"], ref(loss_fn, params)[1]["w"])
    torch.testing.assert_close(g2["w"], ref(loss_fn, params)[1]["w"])
    with pytest.raises(ValueError, match="backend='fast' cannot differentiate this loss: no forward rule for"):
        ForwardGradient(backend="fast")(loss_fn, params)
    with pytest.raises(ValueError, match="unknown backend 'jit'; allowed: auto, fast, func"):
        ForwardGradient(backend="jit")


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


def test_handed_out_estimates_are_never_overwritten_by_later_steps():
    for k in (1, 4):  # k = 1 hands out the tangent buffer itself; k > 1 reuses a tangent buffer across steps
        loss_fn, params = _model_problem("mlp")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rademacher_bits_are_exact_signs_and_every_bit_position_is_balanced(dtype):
    est = ForwardGradient(num_tangents=1, distribution="rademacher", seed=0)
    w = 64 if dtype == torch.float64 else (32 if dtype == torch.float32 else 16)
    rows = 4000
    v = est.sample_tangents({"p": torch.zeros(rows * w, dtype=dtype)})["p"].reshape(rows, w).double()
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    # every bit of the random words must be used: a stuck bit (e.g. a sign bit never set) shows in its column
    se = 1 / math.sqrt(rows)
    assert float(v.mean(0).abs().max()) < Z * se
    assert abs(float((v[:, :-1] * v[:, 1:]).mean())) < Z / math.sqrt(rows * (w - 1))  # neighbours independent


def test_chunked_rng_is_reproducible_across_thread_counts(monkeypatch):
    monkeypatch.setattr(estimators, "_RNG_CHUNK", 1000)
    p = {"w": torch.zeros(3500)}
    threads = torch.get_num_threads()
    draws = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for dist in ("normal", "rademacher"):
                draws[t, dist] = ForwardGradient(distribution=dist, seed=3).sample_tangents(p)["w"]
    finally:
        torch.set_num_threads(threads)
    for dist in ("normal", "rademacher"):
        assert torch.equal(draws[1, dist], draws[2, dist])
    v = draws[1, "normal"].reshape(-1)
    assert not torch.equal(v[:1000], v[1000:2000])  # distinct chunk streams
    assert abs(float(v.std()) - 1) < 0.05


def test_rank1_gram_from_factors_equals_dense_gram():
    g = torch.Generator().manual_seed(0)
    r1 = RankOne(torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 6, generator=g, dtype=DT), (4, 2, 3))
    bias = torch.randn(3, 4, generator=g, dtype=DT)
    d = torch.randn(3, generator=g, dtype=DT)
    c_factor = ForwardGradient._projection_coefficients({"w": r1, "b": bias}, d)
    c_dense = ForwardGradient._projection_coefficients({"w": r1.dense(), "b": bias}, d)
    torch.testing.assert_close(c_factor, c_dense)


def test_rank1_tangents_are_rank_one_with_normal_factors():
    est = ForwardGradient(num_tangents=2, distribution="rank1", seed=0)
    t = est.sample_tangents({"w": torch.zeros(30, 40), "c": torch.zeros(8, 3, 2, 2), "b": torch.zeros(30)})
    assert t["w"].shape == (2, 30, 40) and t["c"].shape == (2, 8, 3, 2, 2) and t["b"].shape == (2, 30)
    for i in range(2):
        assert torch.linalg.matrix_rank(t["w"][i]) == 1
        assert torch.linalg.matrix_rank(t["c"][i].reshape(8, 12)) == 1


def _samples(loss_fn, params, m, **kw):
    est = ForwardGradient(seed=11, **kw)
    return torch.stack([_flat(est(loss_fn, params)[1]) for _ in range(m)])


def test_rank1_is_unbiased_with_the_derived_variance():
    loss_fn, params = _small_mlp()
    a = Backprop()(loss_fn, params)[1]
    a_flat = _flat(a)
    m = 4000
    s = _samples(loss_fn, params, m, distribution="rank1")
    var = _flat(component_variance(a, "rank1"))
    z = ((s.mean(0) - a_flat).abs() / (var / m).sqrt()).max()
    assert float(z) < Z
    # the derived variance itself: E|g - a|^2 summed over components, against its standard error
    err = (s - a_flat).pow(2).sum(1)
    se = float(err.std()) / math.sqrt(m)
    assert abs(float(err.mean()) - total_variance(a, "rank1")) < Z * se


def test_rank1_variance_formula_differs_from_dense_and_the_data_can_tell():
    # A linear loss <A, W> has gradient A everywhere; on a 3 x 4 weight the rank-one total variance
    # 12|A|^2 + (2*3 + 2*4 + 3)|A|^2 = 29|A|^2 is far from the dense 13|A|^2: the check above has the power
    # to tell the two formulas apart, and the data side with rank-one.
    A = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    loss_fn = lambda p: (p["w"] * A).sum()  # noqa: E731
    params = {"w": torch.zeros(3, 4, dtype=DT)}
    m = 4000
    err = (_samples(loss_fn, params, m, distribution="rank1") - A.reshape(-1)).pow(2).sum(1)
    se = float(err.std()) / math.sqrt(m)
    a2 = float(A.pow(2).sum())
    assert total_variance({"w": A}, "rank1") == pytest.approx(29 * a2)
    assert total_variance({"w": A}, "normal") == pytest.approx(13 * a2)
    assert abs(float(err.mean()) - 29 * a2) < Z * se
    assert abs(float(err.mean()) - 13 * a2) > Z * se


def test_rank1_bias_check_has_power_against_a_scaled_estimator():
    loss_fn, params = _small_mlp()
    a = Backprop()(loss_fn, params)[1]
    s = _samples(loss_fn, params, 2000, num_tangents=2, aggregation="sum", distribution="rank1")  # E = 2a
    var = _flat(component_variance(a, "rank1")) * 2
    z = ((s.mean(0) - _flat(a)).abs() / (var / s.shape[0]).sqrt()).max()
    assert float(z) > Z


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("k,agg", [(1, "mean"), (4, "mean"), (4, "projection")])
def test_regenerated_tangents_give_the_same_estimates(dist, k, agg):
    loss_fn, params = _model_problem("convnet", DT)
    _, g_kept = ForwardGradient(k, agg, dist, seed=6, regenerate_tangents=False)(loss_fn, params)
    est = ForwardGradient(k, agg, dist, seed=6, regenerate_tangents=True)
    _, g_regen = est(loss_fn, params)
    assert est._fast_unsupported is None
    torch.testing.assert_close(_flat(g_regen), _flat(g_kept), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_auto_regeneration_keeps_a_prefix_and_gives_the_same_estimates(dist, monkeypatch):
    # A wide first layer and a pass that is small next to it: "auto" keeps the leading tangents and
    # regenerates the trailing ones from the second call on (the first, unmeasured, regenerates all).
    torch.manual_seed(0)
    model = MLP((40,), 3, (60,) * 6).double()  # blocks of 29 KB, n = 166 KB; the pass about 4 x 32 x 60 x 8 B
    x, y = torch.randn(32, 40, dtype=DT), torch.randint(0, 3, (32,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p):
        return cross_entropy(functional_call(model, p, (x,)), y)

    kept_counts = []
    real = ForwardGradient._kept_blocks

    def spy(self, sizes):
        kept_counts.append(real(self, sizes))
        return kept_counts[-1]

    monkeypatch.setattr(ForwardGradient, "_kept_blocks", spy)
    auto = ForwardGradient(distribution=dist, seed=3)
    kept = ForwardGradient(distribution=dist, seed=3, regenerate_tangents=False)
    for _ in range(3):
        torch.testing.assert_close(_flat(auto(loss_fn, params)[1]), _flat(kept(loss_fn, params)[1]),
                                   rtol=1e-12, atol=1e-14)
    n_blocks = len(params)
    assert kept_counts[0::2] == [0, kept_counts[2], kept_counts[2]]  # auto: all regenerated on the first call,
    assert 0 < kept_counts[2] < n_blocks  # then a kept prefix and a regenerated tail
    assert kept_counts[1::2] == [n_blocks] * 3  # regenerate_tangents=False keeps all


def test_tangents_run_in_groups_within_the_memory_budget(monkeypatch):
    loss_fn, params = _model_problem("mlp", DT)
    calls = []
    real = estimators.forward_tangents

    def counting(fn, p, t, k, stats=None):
        calls.append(k)
        return real(fn, p, t, k, stats)

    monkeypatch.setattr(estimators, "forward_tangents", counting)
    one_tangent_mib = 6 * 24 * 8 / 2**20  # the widest tangent: batch 6 x width 24, float64
    est = ForwardGradient(5, "projection", "rank1", seed=1, max_tangent_mib=2.5 * one_tangent_mib)
    _, g1 = est(loss_fn, params)
    assert calls == [1, 2, 2]  # first call: a probe with one tangent, then groups of floor(2.5) = 2
    calls.clear()
    _, g2 = est(loss_fn, params)
    assert calls == [2, 2, 1]
    ref = ForwardGradient(5, "projection", "rank1", seed=1, backend="func")
    torch.testing.assert_close(_flat(g1), _flat(ref(loss_fn, params)[1]))
    torch.testing.assert_close(_flat(g2), _flat(ref(loss_fn, params)[1]))
    with pytest.raises(ValueError, match="max_tangent_mib must be > 0"):
        ForwardGradient(max_tangent_mib=0)


def test_describe_logs_execution_settings_only_when_not_default():
    assert set(ForwardGradient().describe()) == {"estimator", "num_tangents", "aggregation", "distribution", "seed"}
    assert ForwardGradient(regenerate_tangents=False).describe()["regenerate_tangents"] is False
    with pytest.raises(ValueError, match="regenerate_tangents must be true, false or 'auto'"):
        ForwardGradient(regenerate_tangents="sometimes")
    d = ForwardGradient(distribution="rank1", backend="func", regenerate_tangents=True, max_tangent_mib=64).describe()
    assert d["distribution"] == "rank1" and d["backend"] == "func" and d["regenerate_tangents"] is True
    assert d["max_tangent_mib"] == 64
