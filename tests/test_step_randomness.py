"""One random stream per step: every pass of a step sees the same dropout mask, whatever the memory setting.

At k = n with the projection a forward gradient is exact, so with dropout inside the loss it must equal backprop's
gradient *with the same mask* (the mask backprop draws from the same global state), and the global generator
must stand afterwards where one pass leaves it. Each memory setting (tangent groups under a tiny budget,
regenerated or kept tangents, torch.func, the visible fallback after a partial fast pass) runs the primal pass
a different number of times; zeroth order runs 2k + 1 passes; activity perturbation adds a probe pass and, on
torch.func, a recording pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fwdgrad import Backprop, ForwardActivity, ForwardGradient, ZerothOrder, estimate_module_grads
from fwdgrad.nn.functional import per_example_cross_entropy

DT = torch.float64


def _dropout_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).to(DT).train()
    x = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p):
        return functional_call(model, p, (x,)).pow(2).mean()

    return loss_fn, params


def _log1p_everywhere(loss_fn):
    """The same loss through an op the fast engine has no rule for, at the very end: the fast pass runs (and
    draws its dropout mask) before it is abandoned for torch.func."""
    return lambda p: torch.log1p(loss_fn(p)) - torch.log1p(loss_fn(p).detach()) + loss_fn(p).detach()


SETTINGS = {
    "fast, one pass": dict(backend="fast"),
    "fast, tangent groups of one": dict(backend="fast", max_tangent_mib=1e-9),
    "fast, groups, regenerated": dict(backend="fast", max_tangent_mib=1e-9, regenerate_tangents=True),
    "fast, groups, kept": dict(backend="fast", max_tangent_mib=1e-9, regenerate_tangents=False),
    "torch.func": dict(backend="func"),
}


def _after_one_pass(seed: int, loss_fn, params) -> torch.Tensor:
    torch.manual_seed(seed)
    Backprop()(loss_fn, params)
    return torch.get_rng_state()


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_memory_setting_gives_backprops_gradient_at_k_equal_n(setting):
    loss_fn, params = _dropout_problem()
    n = sum(p.numel() for p in params.values())
    torch.manual_seed(7)
    loss_bp, g_bp = Backprop()(loss_fn, params)
    torch.manual_seed(7)
    loss, g = ForwardGradient(n, "projection", seed=3, **SETTINGS[setting])(loss_fn, params)
    torch.testing.assert_close(loss, loss_bp)
    for name in params:
        torch.testing.assert_close(g[name], g_bp[name], rtol=1e-7, atol=1e-9)
    assert torch.equal(torch.get_rng_state(), _after_one_pass(7, loss_fn, params))


def test_the_fallback_after_a_partial_fast_pass_replays_the_mask():
    loss_fn, params = _dropout_problem()
    f = _log1p_everywhere(loss_fn)
    n = sum(p.numel() for p in params.values())
    torch.manual_seed(7)
    _, g_bp = Backprop()(f, params)
    torch.manual_seed(7)
    est = ForwardGradient(n, "projection", seed=3, backend="auto")
    _, g = est(f, params)
    assert est.fallback_reason is not None  # it did start on the fast engine
    for name in params:
        torch.testing.assert_close(g[name], g_bp[name], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_zeroth_orders_passes_share_the_mask(difference):
    # linear in the parameters, so finite differences are exact up to rounding: at k = n the projection is the
    # gradient of the loss with backprop's mask, and only if every one of the 2k + 1 passes drew that mask
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=DT)
    drop = nn.Dropout(0.5).train()

    def loss_fn(p):
        return (drop(x) @ p["w"]).sum()

    params = {"w": torch.randn(4, dtype=DT)}
    torch.manual_seed(11)
    _, g_bp = Backprop()(loss_fn, params)
    torch.manual_seed(11)
    _, g = ZerothOrder(4, 1e-3, aggregation="projection", difference=difference, seed=2)(loss_fn, params)
    torch.testing.assert_close(g["w"], g_bp["w"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["fast", "func"])
def test_activity_perturbation_with_dropout_equals_backprop_at_a_full_basis(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3)).to(DT).train()
    x = torch.randn(5, 3, dtype=DT)
    y = torch.randint(0, 3, (5,))

    def grads(est):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y), x)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, torch.get_rng_state()

    ref, state_bp = grads(Backprop())
    got, state = grads(ForwardActivity(num_tangents=4, aggregation="projection", seed=1, backend=backend))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-7, atol=1e-9)
    assert torch.equal(state, state_bp)  # the probe and recording passes left the step's stream alone


def test_local_losses_one_call_per_block_replay_the_chains_masks():
    # LG-FG-W at k = n per block (both blocks have 35 parameters) equals LG-BP with dropout inside the blocks:
    # block j's own call must draw the masks its body drew in the chain pass that gave its input
    from fwdgrad.nn.models import MLP

    torch.manual_seed(0)
    model = MLP((1, 2, 2), 3, (4, 4), local_losses=True).to(DT).train()
    model.net[1] = nn.Sequential(nn.ReLU(), nn.Dropout(0.4))
    model.net[3] = nn.Sequential(nn.ReLU(), nn.Dropout(0.4))
    x, y = torch.randn(6, 1, 2, 2, dtype=DT), torch.randint(0, 3, (6,))

    def grads(est):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        loss = estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y), x)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, torch.get_rng_state()

    loss_bp, ref, _ = grads(Backprop())
    loss, got, _ = grads(ForwardGradient(35, "projection", seed=4))
    torch.testing.assert_close(loss, loss_bp)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-7, atol=1e-9)
