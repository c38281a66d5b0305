"""Peak-memory measurement (:mod:`fwdgrad.memory`) and the memory model behind ``regenerate_tangents="auto"``."""

from __future__ import annotations

import random

import pytest
import torch

from fwdgrad import Backprop, ForwardGradient, estimate_module_grads, kept_prefix
from fwdgrad.functional import cross_entropy
from fwdgrad.memory import MIB, RssPeak, tensor_peak_mib
from fwdgrad.models import MLP


def test_tensor_peak_counts_live_tensors_exactly():
    def pattern() -> None:
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(MIB // 2)  # 2 MiB: 3 MiB live
        del a
        c = torch.empty(MIB // 8)  # 2.5 MiB live
        del b, c

    assert tensor_peak_mib(pattern) == pytest.approx(3.0, abs=1e-3)
    assert tensor_peak_mib(lambda: None) == 0.0


def test_rss_peak_sees_touched_memory():
    rss = RssPeak().start()
    x = torch.ones(16 * MIB // 4)  # 16 MiB, every page touched
    grown = rss.peak_mib()
    del x
    if rss.source != "rss_hwm_delta":
        pytest.skip("no /proc/self/clear_refs: the RSS peak cannot be reset here")
    assert 16.0 <= grown < 16.0 + 8.0


def _predicted_peak(sizes, keep, pass_bytes):
    n = sum(sizes)
    if keep == len(sizes):
        return n + pass_bytes
    return max(n, sum(sizes[:keep]) + pass_bytes + max(sizes[keep:]))


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


def test_auto_regeneration_peak_matches_the_model_on_a_deep_mlp():
    # 16 hidden layers of width 256 at batch 512: each weight tangent is 256 KiB, each activation 512 KiB,
    # so the pass (4 activations, 2 MiB) is bigger than a block and smaller than n (4.3 MiB).
    torch.manual_seed(0)
    model = MLP((256,), 10, [256] * 16)
    x, y = torch.randn(512, 256), torch.randint(0, 10, (512,))
    sizes = [p.numel() * 4.0 for p in model.parameters()]
    n, block, act = sum(sizes), max(sizes), 512 * 256 * 4.0

    def two_steps(est):
        def run():
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                estimate_module_grads(est, model, lambda out: cross_entropy(out, y), x)
        peak = tensor_peak_mib(run) * MIB
        model.zero_grad(set_to_none=True)
        return peak

    peaks = {
        "backprop": two_steps(Backprop()),
        "kept": two_steps(ForwardGradient(regenerate_tangents=False)),
        "auto": two_steps(ForwardGradient()),
        "regenerated": two_steps(ForwardGradient(regenerate_tangents=True)),
    }
    small = 64 * 1024  # losses, biases' tangents, the loss's softmax over 10 classes
    floor = max(n, ForwardGradient.PASS_TENSORS * act)
    assert peaks["kept"] == pytest.approx(n + ForwardGradient.PASS_TENSORS * act, abs=small)
    assert floor - small <= peaks["regenerated"] <= peaks["auto"] <= floor + block + small
    assert peaks["auto"] < peaks["kept"] - block
    assert peaks["backprop"] > 16 * act  # it stores every layer's activation
