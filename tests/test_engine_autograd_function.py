"""Custom ``torch.autograd.Function``s in the fast engine: their ``jvp`` is used, never their forward's ops.

References: ``Backprop`` on the same loss (with k = n tangents the projection aggregation B (B^T B)^-1 B^T
grad f equals grad f exactly, B being n x n and almost surely invertible), and torch's own forward-mode AD
(``torch.autograd.forward_ad``) tangent by tangent. float64 throughout, so tolerances are rounding-level.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fwdgrad import Backprop, ForwardGradient
from fwdgrad.engine import Unsupported, forward_tangents
from fwdgrad.errors import ConfigError

DT = torch.float64
BACKENDS = ["fast", "auto"]


class GRL(torch.autograd.Function):
    """Gradient reversal, new style (the issue's snippet)."""

    forward = staticmethod(lambda x: x.view_as(x))
    setup_context = staticmethod(lambda c, i, o: None)
    backward = staticmethod(lambda c, g: -g)
    jvp = staticmethod(lambda c, t: -t)


class STE(torch.autograd.Function):
    """Straight-through rounding, old style: forward rounds, the derivative is the identity."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return t


class ScaledSoftplus(torch.autograd.Function):
    """A hand-written derivative with saved tensors and a non-tensor argument (old style):
    y = softplus(beta x) / beta, dy = sigmoid(beta x) dx."""

    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.beta = beta
        return F.softplus(x * beta) / beta

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(ctx.beta * x), None

    @staticmethod
    def jvp(ctx, tx, tbeta):
        assert tbeta is None  # a float argument has no tangent
        (x,) = ctx.saved_tensors
        return tx * torch.sigmoid(ctx.beta * x)


def _exact_grads(loss_fn, params, backend):
    n = sum(p.numel() for p in params.values())
    est = ForwardGradient(num_tangents=n, aggregation="projection", seed=3, backend=backend)
    loss, g = est(loss_fn, params)
    return est, loss, g


def _assert_matches_backprop(loss_fn, params, backend):
    est, loss, g = _exact_grads(loss_fn, params, backend)
    loss_ref, g_ref = Backprop()(loss_fn, params)
    assert est.fallback_reason is None  # stayed on the fast engine
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    for name in params:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-8, atol=1e-10)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    return r, {"w": r(3, 4), "v": r(3)}, r(5, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_issue_snippet_gives_the_reversed_gradient(backend):
    f = lambda p: (GRL.apply(p) * torch.tensor([1.0, 2, 3])).sum()  # noqa: E731
    x = torch.tensor([0.3, -1.2, 2.6])
    g = ForwardGradient(num_tangents=3, aggregation="projection", backend=backend)(f, x)[1]
    torch.testing.assert_close(g, Backprop()(f, x)[1])
    torch.testing.assert_close(g, torch.tensor([-1.0, -2.0, -3.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reversal_inside_a_network(backend):
    _, params, x = _problem()

    def loss_fn(p):
        h = torch.tanh(F.linear(x, p["w"]))  # (5, 3)
        return (GRL.apply(h) @ p["v"]).pow(2).mean() + h.pow(2).mean()

    _assert_matches_backprop(loss_fn, params, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_rounding_passes_the_derivative_through(backend):
    _, params, x = _problem(1)

    def loss_fn(p):
        return ((STE.apply(3 * F.linear(x, p["w"])) - 1.0) @ p["v"]).pow(2).mean()

    _assert_matches_backprop(loss_fn, params, backend)
    g = _exact_grads(loss_fn, params, backend)[2]
    assert g["w"].abs().max() > 0  # differentiating round() instead would give exactly zero here


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_written_jvp_with_saved_tensors_and_a_float_argument(backend):
    _, params, x = _problem(2)

    def loss_fn(p):
        return ScaledSoftplus.apply(F.linear(x, p["w"]), 2.5).mul(p["v"]).sum()

    _assert_matches_backprop(loss_fn, params, backend)


class QuantizedLinear(nn.Linear):
    """A layer whose weight is rounded to a grid in the forward pass, trained straight-through."""

    def forward(self, x):
        return F.linear(x, STE.apply(self.weight * 4) / 4, self.bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_through_a_straight_through_estimator_in_a_model_gets_backprops_gradient(backend):
    torch.manual_seed(0)
    model = nn.Sequential(QuantizedLinear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 2, (6,))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    _assert_matches_backprop(loss_fn, params, backend)


class TwoOutputs(torch.autograd.Function):
    """New style, defaults, save_for_forward, a non-differentiable output and a jvp vmap cannot batch."""

    @staticmethod
    def forward(x, y, scale=3.0):
        return x * y * scale, torch.argmax(x), torch.sin(y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, scale = inputs
        ctx.save_for_forward(x, y)
        ctx.scale = scale
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g0, g1, g2):  # pragma: no cover - not used
        raise NotImplementedError

    @staticmethod
    def jvp(ctx, tx, ty, tscale):
        x, y = ctx.saved_tensors
        if float(tx.abs().sum()) < 0:  # Python control flow on values: vmap refuses, the loop runs
            raise AssertionError
        return ctx.scale * (tx * y + x * ty), None, torch.cos(y) * ty


def test_tangents_equal_torch_forward_mode_tangent_by_tangent():
    g = torch.Generator().manual_seed(5)
    x, y, c0, c2 = (torch.randn(4, generator=g, dtype=DT) for _ in range(4))
    k = 3
    tx, ty = torch.randn(k, 4, generator=g, dtype=DT), torch.randn(k, 4, generator=g, dtype=DT)

    def fn(p):
        a, i, b = TwoOutputs.apply(p["x"], p["y"])
        assert i.dtype == torch.int64
        return (a * c0).sum() + (b * c2).sum()

    _, d = forward_tangents(fn, {"x": x, "y": y}, {"x": tx, "y": ty}, k)
    for j in range(k):
        with fwAD.dual_level():
            a, _, b = TwoOutputs.apply(fwAD.make_dual(x, tx[j]), fwAD.make_dual(y, ty[j]))
            ref = (fwAD.unpack_dual(a).tangent * c0).sum() + (fwAD.unpack_dual(b).tangent * c2).sum()
        torch.testing.assert_close(d[j], ref, rtol=1e-12, atol=1e-14)


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_function_without_jvp_is_a_config_error_naming_it(backend):
    est = ForwardGradient(2, backend=backend)
    msg = r"NoJvp is a custom torch.autograd.Function without a jvp.*Backprop"
    with pytest.raises(ConfigError, match=msg):
        est(lambda p: NoJvp.apply(p).sum(), torch.ones(3, dtype=DT))


class DoubleInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - not used
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return t.mul_(2)


def test_a_forward_writing_into_its_input_is_refused_before_it_runs():
    w = torch.randn(3, dtype=DT)
    kept = w.clone()
    with pytest.raises(Unsupported, match="DoubleInPlace.forward modifies its input in place"):
        forward_tangents(lambda p: DoubleInPlace.apply(p["w"]).sum(), {"w": w}, {"w": torch.randn(1, 3)}, 1)
    assert torch.equal(w, kept)


class GRLVmappable(GRL):
    forward = staticmethod(lambda x: x.view_as(x))  # its own forward, so the message can name this class
    generate_vmap_rule = True  # so that the torch.func fallback can vmap it over k tangents


def test_apply_bypassing_the_hook_falls_back_visibly_and_stays_right(caplog):
    # torch's own apply, as a reference to GRLVmappable.apply taken before fwdgrad was imported would be
    torch_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, GRLVmappable)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    f = lambda p: (torch_apply(p) * c).sum()  # noqa: E731
    x = torch.tensor([0.3, -1.2, 2.6], dtype=DT)
    msg = "backend='fast' cannot differentiate.*inside the forward of .*GRLVmappable"
    with pytest.raises(ValueError, match=msg):
        ForwardGradient(3, "projection", backend="fast")(f, x)
    est = ForwardGradient(3, "projection", backend="auto")
    with caplog.at_level(logging.WARNING, logger="fwdgrad.estimators"):
        _, g = est(f, x)
    assert "fast path unavailable" in caplog.text and "GRLVmappable" in caplog.text
    torch.testing.assert_close(g, -c)


def test_outside_a_pass_apply_is_torchs():
    assert torch.autograd.Function.apply is not torch._C._FunctionBase.__dict__["apply"]  # the hook is in
    x = torch.tensor([0.5, -1.0], dtype=DT, requires_grad=True)
    (GRL.apply(x) * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), -3.0, dtype=DT))
    _, t = torch.func.jvp(GRL.apply, (x.detach(),), (torch.ones(2, dtype=DT),))
    torch.testing.assert_close(t, -torch.ones(2, dtype=DT))
    with fwAD.dual_level():
        out = ScaledSoftplus.apply(fwAD.make_dual(x.detach(), torch.ones(2, dtype=DT)), 2.0)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, torch.sigmoid(2 * x.detach()))


def test_a_mode_above_the_pass_still_lets_the_jvp_through():
    x = torch.tensor([0.3, -1.2, 2.6], dtype=DT)

    def f(p):
        with torch.device("cpu"):  # a TorchFunctionMode on top of the pass's
            return (GRL.apply(p) * torch.arange(1.0, 4.0, dtype=DT)).sum()

    _, d = forward_tangents(lambda p: f(p["x"]), {"x": x}, {"x": torch.eye(3, dtype=DT)}, 3)
    torch.testing.assert_close(d, torch.tensor([-1.0, -2.0, -3.0], dtype=DT))
