"""Peak-memory measurement (:mod:`fwdgrad.perf.memory`), and the measured peaks of ``regenerate_tangents`` against the
memory model (whose unit tests, with :func:`~fwdgrad.estimators.kept_prefix`, are in ``test_regeneration.py``)."""

from __future__ import annotations

import pytest
import torch

from fwdgrad import Backprop, ForwardGradient, estimate_module_grads
from fwdgrad.estimators import PASS_TENSORS
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.perf.memory import MIB, RssPeak, tensor_peak_mib
from fwdgrad.nn.models import MLP


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
    floor = max(n, PASS_TENSORS * act)
    assert peaks["kept"] == pytest.approx(n + PASS_TENSORS * act, abs=small)
    assert floor - small <= peaks["regenerated"] <= peaks["auto"] <= floor + block + small
    assert peaks["auto"] < peaks["kept"] - block
    assert peaks["backprop"] > 16 * act  # it stores every layer's activation
