"""Tangent distributions: the registry, the chunked layout and the draw, each built-in distribution's
statistics, and new distributions used by ForwardGradient without editing it.

Statistics: for rank-one tangents the per-component variance of g = d u v^T is derived in
:mod:`fwdgrad.experiments.quality.structured` (Var g_ij = |a|^2 + 2|A_i,:|^2 + 2|A_:,j|^2 + 3 A_ij^2); the unbiasedness test allows
Z = 4.5 standard errors per component.
"""

from __future__ import annotations

import math

import pytest
import torch
from estimator_problems import DT, Z, flat, mlp_problem, true_grad

from fwdgrad import Backprop, ForwardGradient
from fwdgrad.engine import RankOne, Regenerated
from fwdgrad.estimators import TANGENT_DISTRIBUTIONS, ChunkedDistribution, register_distribution
from fwdgrad.estimators.tangents.rng import ChunkedRNG
from fwdgrad.estimators.tangents.distributions import DrawContext, SamplerDistribution, plan_blocks
from fwdgrad.errors import ConfigError
from fwdgrad.experiments.quality.structured import component_variance, total_variance


def _ctx(seed: int = 0, **kw) -> DrawContext:
    g = torch.Generator().manual_seed(seed)
    return DrawContext(lambda device: g, ChunkedRNG(chunk=kw.pop("chunk", 64)), **kw)


# -- the registry --------------------------------------------------------------------------------------------------
def test_registry_rejects_duplicate_names_and_names_the_allowed_ones():
    with pytest.raises(ValueError, match="tangent distribution 'normal' is already registered"):
        register_distribution("normal")(lambda shape, generator, dtype, device: torch.zeros(shape))
    with pytest.raises(ValueError, match="already registered"):
        TANGENT_DISTRIBUTIONS["rank1"] = TANGENT_DISTRIBUTIONS["normal"]
    assert list(TANGENT_DISTRIBUTIONS)[:3] == ["normal", "rademacher", "rank1"]
    with pytest.raises(ConfigError, match="unknown tangent distribution 'cauchy'; allowed: normal, rademacher, rank1"):
        TANGENT_DISTRIBUTIONS.lookup("cauchy")


def test_a_registered_sampler_is_used_by_forward_gradient_per_parameter_tensor():
    calls = []

    def signs(shape, generator, dtype, device):  # +-1 from the estimator's generator: E[v v^T] = I
        calls.append((shape, generator))
        return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)

    register_distribution("test_signs")(signs)
    try:
        assert isinstance(TANGENT_DISTRIBUTIONS["test_signs"], SamplerDistribution)
        loss_fn, params = mlp_problem()
        est = ForwardGradient(2, "sum", "test_signs", seed=3)
        _, g = est(loss_fn, params)
        assert [c[0] for c in calls] == [(2, *t.shape) for t in params.values()]
        assert all(c[1] is est.generator(torch.device("cpu")) for c in calls)
        # the same tangents again, from a fresh estimator with the same seed: g = B B^T grad f
        v = ForwardGradient(2, "sum", "test_signs", seed=3).sample_tangents(params)
        B = torch.cat([t.reshape(2, -1) for t in v.values()], dim=1)
        torch.testing.assert_close(flat(g), B.T @ (B @ flat(true_grad(loss_fn, params))))
        assert ForwardGradient(distribution="test_signs").describe()["distribution"] == "test_signs"
    finally:
        del TANGENT_DISTRIBUTIONS["test_signs"]
    assert "test_signs" not in TANGENT_DISTRIBUTIONS


class _Uniform(ChunkedDistribution):
    """U(-sqrt 3, sqrt 3) entries: mean 0, variance 1 (E[v^4] = 9/5)."""

    def fill_jobs(self, rng, block, seed0):
        return rng.jobs(block, seed0, lambda b, g: b.uniform_(-math.sqrt(3), math.sqrt(3), generator=g)), None

    def sample(self, shape, generator, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device).uniform_(-math.sqrt(3), math.sqrt(3), generator=generator)


def test_a_registered_chunked_distribution_gets_the_fast_layout_and_regeneration():
    register_distribution("test_uniform")(_Uniform)
    try:
        loss_fn, params = mlp_problem()
        probe = ForwardGradient(1, distribution="test_uniform", regenerate_tangents=True).draw(params)
        assert isinstance(probe.tangents["0.weight"], Regenerated)
        probe = ForwardGradient(1, distribution="test_uniform", regenerate_tangents=False).draw(params)
        assert probe.owned and len(probe.buffers) == 1 and isinstance(probe.tangents["0.weight"], torch.Tensor)
        kept, regen = (ForwardGradient(1, distribution="test_uniform", seed=5, regenerate_tangents=r)
                       for r in (False, True))
        for _ in range(2):
            torch.testing.assert_close(flat(kept(loss_fn, params)[1]), flat(regen(loss_fn, params)[1]),
                                       rtol=1e-12, atol=1e-14)
        v = ForwardGradient(1, distribution="test_uniform").sample_tangents({"w": torch.zeros(20000)})["w"]
        n = v.numel()
        assert abs(float(v.mean())) < Z / math.sqrt(n)
        assert abs(float(v.pow(2).mean()) - 1) < Z * math.sqrt(0.8 / n)  # Var v^2 = 9/5 - 1
    finally:
        del TANGENT_DISTRIBUTIONS["test_uniform"]


# -- the chunked layout ---------------------------------------------------------------------------------------------
def test_plan_gives_contiguous_blocks_with_chunk_ids_in_order():
    params = {"w": torch.zeros(30, 4), "b": torch.zeros(30), "r": torch.zeros(5)}
    rng = ChunkedRNG(chunk=64)
    normal = plan_blocks(TANGENT_DISTRIBUTIONS["normal"], params, 2, rng)
    assert [(b.name, b.size, b.chunk0) for b in normal] == [("w", 240, 0), ("b", 60, 4), ("r", 10, 5)]
    rank1 = plan_blocks(TANGENT_DISTRIBUTIONS["rank1"], params, 2, rng)
    assert [(b.size, b.chunk0) for b in rank1] == [(2 * (30 + 4), 0), (60, 2), (10, 3)]
    rad = plan_blocks(TANGENT_DISTRIBUTIONS["rademacher"], {"b": torch.zeros(30), "w": torch.zeros(3, 3)}, 2, rng)
    # padded to whole 32-bit words; chunk ids count random words, not entries
    assert [(b.size, b.chunk0) for b in rad] == [(64, 0), (32, 1)]


def test_one_buffer_per_device_and_dtype_and_ownership():
    params = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=DT), "c": torch.zeros(6)}
    normal = TANGENT_DISTRIBUTIONS["normal"]
    draw = normal.draw(params, 2, _ctx())
    assert draw.owned and draw.n == 23 and [(b.dtype, b.numel()) for b in draw.buffers] == [
        (torch.float32, 2 * 12 + 2 * 6), (torch.float64, 2 * 5)]
    f32 = draw.buffers[0]
    assert draw.tangents["a"].data_ptr() == f32.data_ptr()  # blocks in parameter order inside the buffer
    assert draw.tangents["c"].data_ptr() == f32.data_ptr() + 24 * f32.element_size()
    scratch = {}
    reused = normal.draw(params, 2, _ctx(scratch=scratch))
    assert not reused.owned and reused.buffers == [] and len(scratch) == 2  # reused next step: not handed out
    again = normal.draw(params, 2, _ctx(scratch=scratch))
    assert again.tangents["a"].data_ptr() == reused.tangents["a"].data_ptr()
    rank1 = TANGENT_DISTRIBUTIONS["rank1"].draw(params, 2, _ctx())
    assert not rank1.owned and isinstance(rank1.tangents["a"], RankOne)  # factors: never scaled in place


@pytest.mark.parametrize("name", ["normal", "rademacher", "counter_normal"])
def test_regenerated_blocks_equal_the_kept_ones(name):
    params = {"w": torch.zeros(40, 30), "b": torch.zeros(40), "v": torch.zeros(7, 3)}
    dist = TANGENT_DISTRIBUTIONS[name]
    kept = dist.draw(params, 3, _ctx(seed=2, chunk=100))
    sizes = []
    part = dist.draw(params, 3, _ctx(seed=2, chunk=100, kept_blocks=lambda s: sizes.extend(s) or 1))
    assert sizes == [b.nbytes for b in plan_blocks(dist, params, 3, ChunkedRNG(chunk=100))]
    assert isinstance(part.tangents["w"], torch.Tensor)
    assert all(isinstance(part.tangents[n], Regenerated) for n in ("b", "v"))
    for n in params:
        assert torch.equal(part.dense()[n], kept.tangents[n])


def test_rademacher_per_tensor_sample_handles_any_size():
    g = torch.Generator().manual_seed(0)
    v = TANGENT_DISTRIBUTIONS["rademacher"]((1, 5), g, torch.float32, torch.device("cpu"))
    assert v.shape == (1, 5) and set(v.unique().tolist()) <= {-1.0, 1.0}


# -- moved from test_fast_paths.py: rademacher bits, rank-one draws and statistics --------------------------------
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


def test_rank1_tangents_are_rank_one_with_normal_factors():
    est = ForwardGradient(num_tangents=2, distribution="rank1", seed=0)
    t = est.sample_tangents({"w": torch.zeros(30, 40), "c": torch.zeros(8, 3, 2, 2), "b": torch.zeros(30)})
    assert t["w"].shape == (2, 30, 40) and t["c"].shape == (2, 8, 3, 2, 2) and t["b"].shape == (2, 30)
    for i in range(2):
        assert torch.linalg.matrix_rank(t["w"][i]) == 1
        assert torch.linalg.matrix_rank(t["c"][i].reshape(8, 12)) == 1


def _samples(loss_fn, params, m, **kw):
    est = ForwardGradient(seed=11, **kw)
    return torch.stack([flat(est(loss_fn, params)[1]) for _ in range(m)])


def test_rank1_is_unbiased_with_the_derived_variance():
    loss_fn, params = mlp_problem()
    a = Backprop()(loss_fn, params)[1]
    a_flat = flat(a)
    m = 4000
    s = _samples(loss_fn, params, m, distribution="rank1")
    var = flat(component_variance(a, "rank1"))
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
    loss_fn, params = mlp_problem()
    a = Backprop()(loss_fn, params)[1]
    s = _samples(loss_fn, params, 2000, num_tangents=2, aggregation="sum", distribution="rank1")  # E = 2a
    var = flat(component_variance(a, "rank1")) * 2
    z = ((s.mean(0) - flat(a)).abs() / (var / s.shape[0]).sqrt()).max()
    assert float(z) > Z
