"""What needs a CUDA device (marker ``cuda``; skipped without one, run by scripts/device_check.sh on a GPU machine).

* the estimators against backprop on CUDA tensors (FG-W at k = n, FG-A at a full activity basis, zeroth order);
* every engine rule on CUDA tensors, against torch.func on PyTorch's OpInfo samples (float32);
* per-device generators: same seed, same tangents; the CPU's and the device's generators are separate;
* no host synchronisation inside a step (``torch.cuda.set_sync_debug_mode("error")`` around warm steps).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fwdgrad import Backprop, ForwardActivity, ForwardGradient, ZerothOrder, estimate_module_grads
from fwdgrad.nn.functional import cross_entropy, per_example_cross_entropy
from fwdgrad.nn.models import MLP

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/device_check.sh)")]
DEV = "cuda"


def _problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(DEV, dtype)
    x = torch.randn(8, 1, 2, 3, device=DEV, dtype=dtype)
    y = torch.randint(0, 3, (8,), device=DEV)
    return model, x, y


def _grads(model, est, x, y):
    model.zero_grad(set_to_none=True)
    estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y), x)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["fg_w", "fg_a", "zo", "fg_w_rank1_func"])
def test_estimators_equal_backprop_on_cuda(name):
    model, x, y = _problem()
    n = sum(p.numel() for p in model.parameters())
    est = {"fg_w": ForwardGradient(n, "projection", seed=0),
           "fg_w_rank1_func": ForwardGradient(n, "projection", seed=0, backend="func"),
           "fg_a": ForwardActivity(num_tangents=5, aggregation="projection", seed=0),
           "zo": ZerothOrder(n, 1e-7, aggregation="projection", seed=0)}[name]
    ref, got = _grads(model, Backprop(), x, y), _grads(model, est, x, y)
    for k in ref:
        assert got[k].device.type == "cuda"
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7)


def test_engine_rules_on_cuda_tensors():
    from test_engine_conformance import _failures, sweep

    assert _failures(sweep(torch.float32, device=DEV)) == []


def test_per_device_generators():
    params = {"w": torch.zeros(1000, device=DEV)}
    a = ForwardGradient(3, seed=5).sample_tangents(params)["w"]
    b = ForwardGradient(3, seed=5).sample_tangents(params)["w"]
    assert a.device.type == "cuda" and torch.equal(a, b)
    est = ForwardGradient(3, seed=5)
    cpu_before = torch.get_rng_state()
    est.sample_tangents(params)
    assert torch.equal(torch.get_rng_state(), cpu_before)  # the estimator's own generator, not the global one
    assert abs(float(a.std()) - 1) < 0.1


@pytest.mark.parametrize("dist,k", [("normal", 1), ("normal", 4), ("rank1", 1), ("rademacher", 4), ("counter_normal", 1)])
def test_a_step_does_not_synchronise_with_the_host(dist, k):
    model = MLP((1, 28, 28), 10, (256, 256)).to(DEV)
    x, y = torch.randn(64, 1, 28, 28, device=DEV), torch.randint(0, 10, (64,), device=DEV)
    est = ForwardGradient(k, distribution=dist, seed=0)
    for _ in range(3):  # warm: the first steps measure the pass and may settle the memory policy
        estimate_module_grads(est, model, lambda o: cross_entropy(o, y), x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        estimate_module_grads(est, model, lambda o: cross_entropy(o, y), x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
