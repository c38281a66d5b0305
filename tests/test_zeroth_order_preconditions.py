"""Zeroth order knows what it cannot see: derivatives the loss defines otherwise than its values, low-precision
parameters and a finite-difference step the dtype cannot carry are refused before the first step, by name.

The refusals are generated: each way of defining a derivative (custom Functions with a backward that is not
the forward's derivative, detaches, no-grad blocks) is inserted at each place of a small random network, and
every placement must be refused, while the same networks without them, a custom Function whose backward *is*
the derivative, and a detach that changes no gradient (a stable log-sum-exp's shift) must not be.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fwdgrad import Backprop, ZerothOrder
from fwdgrad.errors import ConfigError
from fwdgrad.nn.functional import cross_entropy

DT = torch.float64


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return -g


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


class TrueCube(torch.autograd.Function):
    """A custom Function whose backward is its forward's derivative (as a fused op would be): not refused."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def _no_grad_scale(h):
    with torch.no_grad():
        s = h.abs().mean()
    return h * s


#: name -> a function of an activation that defines its derivative otherwise than its values
UNSEEN = {
    "gradient reversal": lambda h: GradReverse.apply(h),
    "straight-through round (Function)": lambda h: StraightThroughRound.apply(h),
    "gradient reversal (apply taken earlier)": GradReverse.apply,
    "straight-through round (detach idiom)": lambda h: h + (torch.round(h) - h).detach(),
    "p * p.detach()": lambda h: h * h.detach(),
    ".data": lambda h: h * h.data,
    "no_grad block": _no_grad_scale,
}
#: the same places, with derivatives that match the values: never refused
SEEN = {
    "plain": lambda h: h,
    "custom Function with the true backward": lambda h: TrueCube.apply(h),
    "detached shift that cancels": lambda h: h - h.detach().amax() + h.detach().amax(),
}


def _network(depth: int, where: int, op, seed: int):
    """A tanh MLP of ``depth`` layers (float64) with ``op`` applied after layer ``where``: (loss_fn, params)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [4] + [3 + (seed + i) % 3 for i in range(depth)] + [3]
    params = {f"w{i}": torch.randn(sizes[i + 1], sizes[i], generator=g, dtype=DT) / 2 for i in range(depth + 1)}
    x = torch.randn(5, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=g)

    def loss_fn(p):
        h = x
        for i in range(depth + 1):
            h = F.linear(h, p[f"w{i}"])
            if i < depth:
                h = torch.tanh(h)
            if i == where:
                h = op(h)
        return cross_entropy(h, y)

    return loss_fn, params


CASES = [(name, depth, where, seed) for (name, seed), depth in itertools.product(
    [(n, s) for s, n in enumerate(UNSEEN)], (1, 2, 3)) for where in range(depth + 1)]


@pytest.mark.parametrize("name,depth,where,seed", CASES)
def test_every_placement_of_an_unseen_derivative_is_refused_by_name(name, depth, where, seed):
    loss_fn, params = _network(depth, where, UNSEEN[name], seed)
    kept = {n: p.clone() for n, p in params.items()}
    with pytest.raises(ConfigError, match="defines its derivative otherwise") as err:
        ZerothOrder(2, 1e-3, seed=0)(loss_fn, params)
    assert "check_derivatives=false" in str(err.value) and "\n" not in str(err.value)
    if "reversal" in name or "(Function)" in name:
        assert ("GradReverse" if "reversal" in name else "StraightThroughRound") in str(err.value)
    assert all(torch.equal(params[n], kept[n]) for n in params)


@pytest.mark.parametrize("name", list(SEEN))
@pytest.mark.parametrize("depth,where", [(1, 0), (2, 1), (3, 3)])
def test_derivatives_that_match_the_values_are_not_refused(name, depth, where):
    loss_fn, params = _network(depth, where, SEEN[name], seed=depth + where)
    ZerothOrder(2, 1e-3, seed=0)(loss_fn, params)  # no refusal
    # and the estimate agrees with backprop in direction at k = n with the projection (up to the eps bias)
    n = sum(p.numel() for p in params.values())
    _, g = ZerothOrder(n, 1e-5, aggregation="projection", seed=1)(loss_fn, params)
    _, g_bp = Backprop()(loss_fn, params)
    for k in params:
        torch.testing.assert_close(g[k], g_bp[k], rtol=1e-4, atol=1e-7)


def test_opting_out_estimates_the_values_derivative_with_a_warning(caplog):
    loss_fn, params = _network(1, 0, lambda h: GradReverse.apply(h), seed=0)
    est = ZerothOrder(2, 1e-3, seed=0, check_derivatives=False)
    est(loss_fn, params)
    assert "GradReverse" in caplog.text and est.describe()["check_derivatives"] is False


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_are_refused(dtype):
    params = {"w": torch.randn(4).to(dtype)}
    with pytest.raises(ConfigError, match="float32 or float64 parameters.*model.float"):
        ZerothOrder(seed=0)(lambda p: (p["w"].float() ** 2).sum(), params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["tiny", "huge"])
def test_an_epsilon_the_dtype_cannot_carry_is_refused(dtype, scale):
    info = torch.finfo(dtype)
    eps = info.eps / 4 if scale == "tiny" else float(info.max) ** 0.5
    with pytest.raises(ConfigError, match=f"epsilon=.*{str(dtype)[6:]}"):
        ZerothOrder(epsilon=eps, seed=0)(lambda p: (p["w"] ** 2).sum(), {"w": torch.randn(3, dtype=dtype)})
    for bad in [b for b in (1e30, 1e300) if b * b > float(info.max)]:  # the 1e30 (float32) and 1e300
        with pytest.raises(ConfigError, match="overflow"):
            ZerothOrder(epsilon=bad, seed=0)(lambda p: (p["w"] ** 2).sum(), {"w": torch.randn(3, dtype=dtype)})


def test_a_model_through_estimate_module_grads_is_checked_too():
    from fwdgrad import estimate_module_grads

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 2, (5,))
    with pytest.raises(ConfigError, match="GradReverse"):
        estimate_module_grads(ZerothOrder(seed=0), model, lambda o: cross_entropy(GradReverse.apply(o), y), x)
    loss = estimate_module_grads(ZerothOrder(seed=0), model, lambda o: cross_entropy(o, y), x)
    assert torch.isfinite(loss)
