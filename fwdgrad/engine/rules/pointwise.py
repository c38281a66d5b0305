"""Rules for elementwise ops: activations and functions ``y = s(x), y_dot = s'(x) x_dot``, and arithmetic
with broadcasting.

Broadcasting: a tangent ``(k, *s)`` meets primal operands of other shapes. Rules give it singleton dims
after k (:func:`~fwdgrad.engine.tangent_types.aligned`) so k never lines up with a primal dim, and expand a
result to the output's tangent shape (:func:`~fwdgrad.engine.tangent_types.full`) where broadcasting left it
smaller. Tangents are never modified in place, so a rule may hand its input tangent on unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import aligned, dense, full
from fwdgrad.errors import Unsupported

T = torch.Tensor

# -- activations ------------------------------------------------------------------------------------------


@register(F.relu, torch.relu, T.relu)
def _relu(s: PassState, x: Tensor, inplace: bool = False) -> Tensor:
    tx = dense(s.tangent(x))
    if inplace:
        s.check_in_place(x, "relu")
    out = torch.relu_(x) if inplace else torch.relu(x)
    # y_dot = x_dot where x > 0, else 0 (out > 0 iff x > 0): one fused pass, no mask tensor; the primal
    # broadcasts over the k tangents as a stride-0 view, and a batch-major tangent stays batch-major.
    return s.attach(out, torch.ops.aten.threshold_backward(tx, out.expand_as(tx), 0))


# The smooth activations below take y_dot = s'(x) x_dot from the activation's own backward kernel (what backprop
# runs: ``*_backward(grad, ...)`` is grad * s'(x)), one fused pass over the k tangents with the primal broadcast as
# a stride-0 view, instead of building s'(x) from several elementwise ops. Inside a pass that runs within another
# pass (a loss that calls forward_tangents), the enclosing pass must see differentiable ops, so there the rules
# build s'(x) from elementwise ops, which that pass has rules for.


def nested() -> bool:
    """Whether an enclosing TorchFunctionMode (another pass) sees the ops this rule runs."""
    return torch._C._len_torch_function_stack() > 0


@register(torch.tanh, T.tanh, F.tanh)
def _tanh(s: PassState, x: Tensor) -> Tensor:
    tx = dense(s.tangent(x))
    out = torch.tanh(x)
    if nested():
        return s.attach(out, tx * (1 - out * out))
    return s.attach(out, torch.ops.aten.tanh_backward(tx, out.expand_as(tx)))  # x_dot (1 - y^2)


@register(torch.sigmoid, T.sigmoid, F.sigmoid)
def _sigmoid(s: PassState, x: Tensor) -> Tensor:
    tx = dense(s.tangent(x))
    out = torch.sigmoid(x)
    if nested():
        return s.attach(out, tx * (out * (1 - out)))
    return s.attach(out, torch.ops.aten.sigmoid_backward(tx, out.expand_as(tx)))  # x_dot y (1 - y)


@register(F.silu)
def _silu(s: PassState, x: Tensor, inplace: bool = False) -> Tensor:
    tx = dense(s.tangent(x))
    if nested():
        if inplace:
            raise Unsupported("in-place silu inside a nested pass")
        sig = torch.sigmoid(x)
        return s.attach(x * sig, tx * (sig * (1 + x * (1 - sig))))  # d/dx x s(x) = s + x s (1 - s)
    t = torch.ops.aten.silu_backward(tx, x.expand_as(tx))  # needs x before an in-place write
    if inplace:
        s.check_in_place(x, "silu")
        return s.attach(F.silu(x, inplace=True), t)
    return s.attach(F.silu(x), t)


@register(F.gelu)
def _gelu(s: PassState, x: Tensor, approximate: str = "none") -> Tensor:
    tx = dense(s.tangent(x))
    out = F.gelu(x, approximate=approximate)
    if nested():  # its derivative needs erf, which has no rule: the estimator falls back to torch.func, visibly
        raise Unsupported("gelu inside a pass within another pass")
    # exact: Phi(x) + x phi(x); "tanh": the derivative of torch's tanh approximation
    return s.attach(out, torch.ops.aten.gelu_backward(tx, x.expand_as(tx), approximate=approximate))


# -- elementwise functions --------------------------------------------------------------------------------


@register(torch.exp, T.exp)
def _exp(s: PassState, x: Tensor) -> Tensor:
    out = torch.exp(x)
    return s.attach(out, dense(s.tangent(x)) * out)


@register(torch.log, T.log)
def _log(s: PassState, x: Tensor) -> Tensor:
    return s.attach(torch.log(x), dense(s.tangent(x)) / x)


@register(torch.sqrt, T.sqrt)
def _sqrt(s: PassState, x: Tensor) -> Tensor:
    out = torch.sqrt(x)
    return s.attach(out, dense(s.tangent(x)) / (2 * out))


@register(torch.neg, T.neg, T.__neg__)
def _neg(s: PassState, x: Tensor) -> Tensor:
    return s.attach(torch.neg(x), -dense(s.tangent(x)))


@register(torch.abs, T.abs, T.__abs__)
def _abs(s: PassState, x: Tensor) -> Tensor:
    return s.attach(torch.abs(x), dense(s.tangent(x)) * torch.sign(x))


@register(torch.sin, T.sin)
def _sin(s: PassState, x: Tensor) -> Tensor:
    return s.attach(torch.sin(x), dense(s.tangent(x)) * torch.cos(x))


@register(torch.cos, T.cos)
def _cos(s: PassState, x: Tensor) -> Tensor:
    return s.attach(torch.cos(x), -dense(s.tangent(x)) * torch.sin(x))


@register(torch.square, T.square)
def _square(s: PassState, x: Tensor) -> Tensor:
    return s.attach(torch.square(x), dense(s.tangent(x)) * (2 * x))


def _power(s: PassState, x: Any, e: Any, out: Tensor) -> Tensor:
    """The tangent of ``out = x ** e``: ``d = e x^(e-1) x_dot + x^e ln(x) e_dot``, with torch's own conventions
    where a factor is 0 * inf (``pow_backward`` in derivatives.yaml): the first term is 0 where ``e == 0`` (also
    at ``x = 0``), the second where ``x == 0`` and ``e >= 0``; so the tangent is finite wherever backprop's is."""
    tx, te = aligned(s.tangent(x), out), aligned(s.tangent(e), out)
    t = None
    if tx is not None:
        if isinstance(e, (int, float)) and e == 2:
            t = tx * (2 * x)
        else:
            et = torch.as_tensor(e, dtype=out.dtype, device=out.device)
            t = tx * (et * torch.pow(x, et - 1)).masked_fill(et == 0, 0)
    if te is not None:
        xt = torch.as_tensor(x, dtype=out.dtype, device=out.device)
        t2 = te * (out * torch.log(xt)).masked_fill((xt == 0) & (torch.as_tensor(e) >= 0), 0)
        t = t2 if t is None else t + t2
    return s.attach(out, full(t, out.shape))


@register(torch.pow, T.pow, T.__pow__)
def _pow(s: PassState, x: Any, e: Any) -> Tensor:
    return _power(s, x, e, torch.pow(x, e))


@register(T.__rpow__)
def _rpow(s: PassState, e: Tensor, base: Any) -> Tensor:  # base ** e
    return _power(s, base, e, torch.pow(base, e))


# -- arithmetic with broadcasting -------------------------------------------------------------------------


def _addsub(s: PassState, a: Any, b: Any, alpha: Any, sign: int, out: Tensor) -> Tensor:
    ta, tb = dense(s.tangent(a)), dense(s.tangent(b))
    if tb is not None:
        tb = tb * (sign * alpha) if (sign * alpha) != 1 else tb
    if ta is None:
        t = full(tb, out.shape)
    elif tb is None:
        t = full(ta, out.shape)  # shared, not copied: tangents are never modified in place
    else:
        t = full(ta, out.shape) + full(tb, out.shape)
    return s.attach(out, t)


@register(torch.add, T.add, T.__add__, T.__radd__)
def _add(s: PassState, a: Any, b: Any, *, alpha: Any = 1) -> Tensor:
    return _addsub(s, a, b, alpha, 1, torch.add(a, b, alpha=alpha))


@register(torch.sub, T.sub, T.__sub__)
def _sub(s: PassState, a: Any, b: Any, *, alpha: Any = 1) -> Tensor:
    return _addsub(s, a, b, alpha, -1, torch.sub(a, b, alpha=alpha))


@register(T.__rsub__, torch.rsub)
def _rsub(s: PassState, a: Tensor, b: Any, alpha: Any = 1) -> Tensor:  # b - alpha * a
    out = torch.rsub(a, b, alpha=alpha)
    ta, tb = dense(s.tangent(a)), dense(s.tangent(b))
    t = full(-alpha * ta, out.shape) if ta is not None else None
    if tb is not None:
        t = full(tb, out.shape) if t is None else t + full(tb, out.shape)
    return s.attach(out, t)


@register(torch.mul, T.mul, T.__mul__, T.__rmul__)
def _mul(s: PassState, a: Any, b: Any) -> Tensor:
    out = torch.mul(a, b)
    ta, tb = aligned(s.tangent(a), out), aligned(s.tangent(b), out)
    t = None if ta is None else ta * b
    if tb is not None:
        t = a * tb if t is None else t + a * tb
    return s.attach(out, full(t, out.shape))


@register(torch.div, torch.true_divide, T.div, T.__truediv__, T.true_divide)
def _div(s: PassState, a: Any, b: Any, *, rounding_mode: Optional[str] = None) -> Tensor:
    if rounding_mode is not None:
        raise Unsupported("div with rounding_mode")
    out = torch.div(a, b)
    ta, tb = aligned(s.tangent(a), out), aligned(s.tangent(b), out)
    # d(a/b) = a_dot / b - (a/b) b_dot / b
    t = None if ta is None else ta / b
    if tb is not None:
        t2 = tb * (out / b)
        t = -t2 if t is None else t - t2
    return s.attach(out, full(t, out.shape))


@register(T.__rtruediv__)
def _rdiv(s: PassState, b: Tensor, a: Any) -> Tensor:  # a / b (a a number, or a tensor that may carry tangents)
    return _div(s, a, b)
