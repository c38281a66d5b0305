"""The memory policy: which tangents are kept or regenerated (kept_prefix, "auto"), tangent groups under
max_tangent_mib, and the state carried between calls; none of it changes the estimates."""

from __future__ import annotations

import random

import pytest
import torch
from estimator_problems import DT, flat, model_problem
from torch.func import functional_call

from fwdgrad import ForwardGradient
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import (
    PASS_TENSORS,
    TangentMemoryPolicy,
    backends,
    kept_prefix,
    predicted_peak,
    regeneration_pays,
)
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.nn.models import MLP


# -- the policy on its own ------------------------------------------------------------------------------------------
def test_policy_state_first_call_regenerates_all_then_keeps_a_prefix():
    sizes = [1.0] * 33
    auto = TangentMemoryPolicy(1)
    assert auto.bytes_per_tangent is None and auto.kept_blocks(sizes) == 0  # nothing measured yet
    auto.record(2.0)  # a pass of PASS_TENSORS * 2 = 8 blocks
    assert auto.bytes_per_tangent == 2.0 and auto.kept_blocks(sizes) == kept_prefix(sizes, PASS_TENSORS * 2.0) == 25
    assert TangentMemoryPolicy(1, regenerate=True).kept_blocks(sizes) == 0
    assert TangentMemoryPolicy(1, regenerate=False).kept_blocks(sizes) == 33
    assert TangentMemoryPolicy(4).kept_blocks(sizes) == 33  # "auto" keeps all with k > 1


def test_policy_group_sizes_under_the_budget():
    policy = TangentMemoryPolicy(10, max_tangent_mib=1.0)
    assert policy.group_size(10, None) == 1  # no measurement: probe with one tangent
    assert policy.group_size(10, 0.3 * 2**20) == 3  # floor(1 MiB / 0.3 MiB)
    assert policy.group_size(2, 0.3 * 2**20) == 2  # never more than what remains
    assert policy.group_size(10, 5.0 * 2**20) == 1  # one tangent over budget still runs, alone
    assert policy.group_size(10, 0.0) == 10


@pytest.mark.parametrize("kwargs,match", [({"regenerate": "sometimes"}, "regenerate_tangents must be true, false"),
                                          ({"max_tangent_mib": 0}, "max_tangent_mib must be > 0")])
def test_policy_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TangentMemoryPolicy(1, **kwargs)


def test_auto_keeps_every_tangent_where_regenerating_does_not_pay():
    # The benchmark MLP 784-1024-1024-10 (float32) at batch 1024: the pass (4 x 4 MiB) dominates the 7.1 MiB of
    # tangents, kept_prefix would regenerate all of them (peak 23.1 -> 20.0 MiB) for a second draw of 7.1 MiB:
    # 3.1 MiB saved < half of 7.1, so "auto" keeps them all.
    sizes = [784 * 1024 * 4, 1024 * 4, 1024 * 1024 * 4, 1024 * 4, 1024 * 10 * 4, 10 * 4]
    policy = TangentMemoryPolicy(1)
    policy.record(1024 * 1024 * 4)
    assert kept_prefix(sizes, PASS_TENSORS * 1024 * 1024 * 4) == 0
    assert not regeneration_pays(sizes, 0, PASS_TENSORS * 1024 * 1024 * 4)
    assert policy.kept_blocks(sizes) == len(sizes)
    # the deep MLP's shape (33 equal blocks, a pass of 8): 8 blocks redrawn take 7 off a 41-block peak
    assert regeneration_pays([1.0] * 33, 25, 8.0) and predicted_peak([1.0] * 33, 25, 8.0) == 34.0


def test_regeneration_pays_is_the_saving_per_redrawn_byte():
    rng = random.Random(1)
    for _ in range(300):
        sizes = [rng.random() + 0.01 for _ in range(rng.randint(1, 10))]
        pass_bytes, keep = rng.random() * 2 * sum(sizes), rng.randint(0, len(sizes))
        saved = predicted_peak(sizes, len(sizes), pass_bytes) - predicted_peak(sizes, keep, pass_bytes)
        redrawn = sum(sizes[keep:])
        assert regeneration_pays(sizes, keep, pass_bytes) == (redrawn > 0 and saved >= 0.5 * redrawn)
    assert not regeneration_pays([1.0, 1.0], 2, 5.0)  # nothing regenerated: nothing to pay for


# -- moved from test_memory.py: the memory model behind "auto" ------------------------------------------------------
def _predicted_peak(sizes, keep, pass_bytes):
    n = sum(sizes)
    if keep == len(sizes):
        return n + pass_bytes
    return max(n, sum(sizes[:keep]) + pass_bytes + max(sizes[keep:]))


def test_predicted_peak_is_the_memory_model():
    rng = random.Random(2)
    for _ in range(100):
        sizes = [rng.random() + 0.01 for _ in range(rng.randint(1, 8))]
        keep, pass_bytes = rng.randint(0, len(sizes)), rng.random() * 3
        assert predicted_peak(sizes, keep, pass_bytes) == pytest.approx(_predicted_peak(sizes, keep, pass_bytes))


def test_kept_prefix_cases():
    assert kept_prefix([], 10.0) == 0
    assert kept_prefix([4.0, 1.0, 4.0], 2.0) == 3  # pass smaller than a block: regenerating saves nothing
    assert kept_prefix([4.0, 1.0, 4.0], 100.0) == 0  # the pass dominates: regenerate everything
    # the deep MLP's shape: 33 equal blocks, a pass of 8 blocks: keep 25, regenerate the last 8
    assert kept_prefix([1.0] * 33, 8.0) == 25


def test_kept_prefix_is_the_longest_prefix_within_one_block_of_the_floor():
    rng = random.Random(0)
    for _ in range(500):
        sizes = [rng.choice([0.01, 1.0, 3.0, 8.0]) * rng.random() + 0.001 for _ in range(rng.randint(1, 12))]
        pass_bytes = rng.random() * 2 * sum(sizes)
        keep = kept_prefix(sizes, pass_bytes)
        bound = max(sum(sizes), pass_bytes) + max(sizes)
        assert _predicted_peak(sizes, keep, pass_bytes) <= bound + 1e-9
        if keep < len(sizes):  # keeping one more block would break the bound
            assert _predicted_peak(sizes, keep + 1, pass_bytes) > bound - 1e-9


# -- moved from test_fast_paths.py: same estimates in every mode, groups --------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "rademacher", "counter_normal"])
@pytest.mark.parametrize("k,agg", [(1, "mean"), (4, "mean"), (4, "projection")])
def test_regenerated_tangents_give_the_same_estimates(dist, k, agg):
    loss_fn, params = model_problem("convnet", DT)
    _, g_kept = ForwardGradient(k, agg, dist, seed=6, regenerate_tangents=False)(loss_fn, params)
    est = ForwardGradient(k, agg, dist, seed=6, regenerate_tangents=True)
    _, g_regen = est(loss_fn, params)
    assert est.fallback_reason is None
    torch.testing.assert_close(flat(g_regen), flat(g_kept), rtol=1e-12, atol=1e-14)


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
    real = TangentMemoryPolicy.kept_blocks

    def spy(self, sizes):
        kept_counts.append(real(self, sizes))
        return kept_counts[-1]

    monkeypatch.setattr(TangentMemoryPolicy, "kept_blocks", spy)
    auto = ForwardGradient(distribution=dist, seed=3)
    kept = ForwardGradient(distribution=dist, seed=3, regenerate_tangents=False)
    for _ in range(3):
        torch.testing.assert_close(flat(auto(loss_fn, params)[1]), flat(kept(loss_fn, params)[1]),
                                   rtol=1e-12, atol=1e-14)
    n_blocks = len(params)
    assert kept_counts[0::2] == [0, kept_counts[2], kept_counts[2]]  # auto: all regenerated on the first call,
    assert 0 < kept_counts[2] < n_blocks  # then a kept prefix and a regenerated tail
    assert kept_counts[1::2] == [n_blocks] * 3  # regenerate_tangents=False keeps all


def test_tangents_run_in_groups_within_the_memory_budget(monkeypatch):
    loss_fn, params = model_problem("mlp", DT)
    calls = []
    real = backends.forward_tangents

    def counting(fn, p, t, k, stats=None):
        calls.append(k)
        return real(fn, p, t, k, stats)

    monkeypatch.setattr(backends, "forward_tangents", counting)
    one_tangent_mib = 6 * 24 * 8 / 2**20  # the widest tangent: batch 6 x width 24, float64
    est = ForwardGradient(5, "projection", "rank1", seed=1, max_tangent_mib=2.5 * one_tangent_mib)
    _, g1 = est(loss_fn, params)
    assert calls == [1, 2, 2]  # first call: a probe with one tangent, then groups of floor(2.5) = 2
    calls.clear()
    _, g2 = est(loss_fn, params)
    assert calls == [2, 2, 1]
    ref = ForwardGradient(5, "projection", "rank1", seed=1, backend="func")
    torch.testing.assert_close(flat(g1), flat(ref(loss_fn, params)[1]))
    torch.testing.assert_close(flat(g2), flat(ref(loss_fn, params)[1]))
    with pytest.raises(ValueError, match="max_tangent_mib must be > 0"):
        ForwardGradient(max_tangent_mib=0)
