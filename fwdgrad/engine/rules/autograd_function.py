"""The rule for custom ``torch.autograd.Function``s: ``forward`` on the primals, ``jvp`` on the tangents.

How a Function's call reaches this rule is in :mod:`fwdgrad.engine.mode`. The rule does what torch's
forward-mode AD does for ``Function.apply`` (``torch/csrc/autograd/python_function.cpp``), for k tangents:

1. Inputs. New style (``setup_context`` defined): the arguments bound to ``forward``'s signature, defaults
   included. Old style (``forward(ctx, ...)``): the positional arguments, keyword arguments bound to their
   positions.
2. ``forward`` runs with forward-mode AD off (its own ops are not differentiated), then, new style,
   ``setup_context(ctx, inputs, output)``. ``ctx`` is what torch gives in a no-grad forward-mode pass:
   ``needs_input_grad`` false for inputs that do not require grad, and in ``jvp`` ``ctx.saved_tensors`` is
   what ``ctx.save_for_forward`` saved (``save_for_backward`` is for ``backward`` only).
3. ``jvp(ctx, *input_tangents)``: one tangent per input, ``None`` for a non-tensor, zeros for a tensor
   without tangent (``None`` after ``ctx.set_materialize_grads(False)``); it returns one tangent per output,
   ``None`` meaning zero.

The k tangents go through ``jvp`` as one ``torch.vmap`` call; a ``jvp`` that cannot be vmapped (Python
control flow on values, ``.item()``, ``None`` among some outputs only) runs once per tangent, for this op
only. Where torch forward-mode AD would reject a Function's ``jvp`` only for the view semantics of dual
tensors (``forward`` returning its input as-is with a ``jvp`` that is not a view), the output here is a
fresh alias carrying the ``jvp``'s tangent, which is the derivative the Function defines.

A Function without ``jvp`` is a :class:`~fwdgrad.errors.ConfigError`: differentiating its ``forward``
would silently replace its custom derivative (the sign of a gradient reversal, the identity of a
straight-through estimator), and ``torch.func`` cannot differentiate it either.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.autograd.function import FunctionCtx
from torch.overrides import TorchFunctionMode

from fwdgrad.engine.mode import autograd_function_apply, func_name, is_in_place
from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import dense, k_of
from fwdgrad.errors import ConfigError, Unsupported


class _Ctx(FunctionCtx):
    """The ``ctx`` of one call, as torch's forward-mode AD passes it to forward/setup_context/jvp."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        self.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in inputs)
        self.materialize_grads = True

    @property
    def saved_tensors(self) -> Tuple[Tensor, ...]:
        return getattr(self, "saved_for_forward", ())


class _NoInPlaceOnInputs(TorchFunctionMode):
    """Around ``forward``: refuse, before it runs, an in-place op on one of the Function's inputs or on a
    tangent-carrying tensor (the engine cannot follow it, and a fallback must not see mutated tensors)."""

    def __init__(self, name: str, inputs: Sequence[Any], state: PassState) -> None:
        super().__init__()
        self.name, self.inputs, self.state = name, inputs, state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if is_in_place(func, kwargs) and (args or "out" in kwargs):
            target = kwargs["out"] if "out" in kwargs else args[0]
            if any(target is a for a in self.inputs) or self.state.tangent(target) is not None:
                raise Unsupported(f"{self.name}.forward modifies its input in place ({func_name(func)})")
        return func(*args, **kwargs)


@register(autograd_function_apply)
def _custom_function(s: PassState, cls: type, *args: Any, **kwargs: Any) -> Any:
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.jvp is torch.autograd.Function.jvp:  # type: ignore[attr-defined]
        raise ConfigError(
            f"{name} is a custom torch.autograd.Function without a jvp, so a forward gradient cannot pass "
            "through it: differentiating the ops of its forward would silently ignore its custom backward. "
            "Give it a forward-mode rule, a staticmethod jvp(ctx, *input_tangents) returning one tangent "
            "per output (save what it needs with ctx.save_for_forward, or define setup_context), or "
            "estimate this loss with Backprop."
        )
    new_style = cls.setup_context is not torch.autograd.Function.setup_context  # type: ignore[attr-defined]
    inputs, extra = _bind(cls.forward, args, kwargs, new_style)
    ctx = _Ctx(inputs)
    with _set_fwd_grad_enabled(False), _NoInPlaceOnInputs(name, inputs, s):
        out = cls.forward(*inputs, **extra) if new_style else cls.forward(ctx, *inputs, **extra)
    with _set_fwd_grad_enabled(False):
        if new_style:
            cls.setup_context(ctx, inputs, out)  # type: ignore[attr-defined]
        if getattr(ctx, "dirty_tensors", None):
            raise Unsupported(f"{name} modifies an input in place (ctx.mark_dirty)")
        in_tangents = [s.tangent(a) for a in inputs]
        if all(t is None for t in in_tangents):  # tangents only inside containers: not inputs, as in torch
            return out
        out_tangents = _jvp(cls, ctx, inputs, in_tangents, k_of(*in_tangents))
    return _attach(s, name, ctx, inputs, out, out_tangents)


def _bind(forward: Any, args: Tuple[Any, ...], kwargs: dict, new_style: bool) -> Tuple[Tuple[Any, ...], dict]:
    """``forward``'s inputs as torch's ``apply`` forms them (module docstring, step 1)."""
    if new_style:
        bound = inspect.signature(forward).bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.args, bound.kwargs
    if not kwargs:
        return args, {}
    bound = inspect.signature(forward).bind(None, *args, **kwargs)  # None stands for ctx
    return bound.args[1:], bound.kwargs


def _jvp(
    cls: type, ctx: _Ctx, inputs: Sequence[Any], tangents: Sequence[Any], k: int
) -> List[Optional[Tensor]]:
    """``jvp`` over the k input tangents: per output a ``(k, *shape)`` tangent or ``None`` (zero)."""
    ts: List[Any] = []  # per input: its (k, *shape) tangents, or one tangent for all k (zeros), or None
    dims: List[Optional[int]] = []
    for a, t in zip(inputs, tangents):
        if t is not None:
            ts.append(dense(t))
            dims.append(0)
        else:
            floating = isinstance(a, Tensor) and (a.is_floating_point() or a.is_complex())
            zero = floating and ctx.materialize_grads
            ts.append(torch.zeros_like(a) if zero else None)
            dims.append(None)
    pick = lambda i: [t[i] if d == 0 else t for t, d in zip(ts, dims)]  # noqa: E731  tangent i of each input
    if k == 1:
        return [None if o is None else o.unsqueeze(0) for o in _as_tuple(cls.jvp(ctx, *pick(0)))]
    nones: List[bool] = []

    def one(*tangent: Any) -> Tuple[Tensor, ...]:
        res = _as_tuple(cls.jvp(ctx, *tangent))
        nones[:] = [o is None for o in res]
        return tuple(torch.zeros(()) if o is None else o for o in res)

    try:
        batched = torch.vmap(one, in_dims=tuple(dims), randomness="error")(*ts)
    except (RuntimeError, ValueError):  # not vmappable: once per tangent (a genuine error re-raises there)
        per = [_as_tuple(cls.jvp(ctx, *pick(i))) for i in range(k)]
        return [None if o is None else torch.stack([p[j] for p in per]) for j, o in enumerate(per[0])]
    return [None if n else o for o, n in zip(batched, nones)]


def _as_tuple(x: Any) -> Tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


def _attach(s: PassState, name: str, ctx: _Ctx, inputs: Sequence[Any], out: Any, tangents: List[Any]) -> Any:
    """Hang each output's tangents off it; an output that is an input (or carries tangents already) becomes
    a fresh alias first, so the input keeps its own tangents."""
    outs = _as_tuple(out)
    if len(tangents) != len(outs):
        raise ConfigError(
            f"{name}.jvp returned {len(tangents)} tangent(s) for the {len(outs)} output(s) of its forward; "
            "it must return one per output (None for an output without derivative)."
        )
    skip = getattr(ctx, "non_differentiable", ())
    result = []
    for o, t in zip(outs, tangents):
        if isinstance(o, Tensor):
            floating = o.is_floating_point() or o.is_complex()
            wanted = t is not None and floating and not any(o is n for n in skip)
            if any(o is a for a in inputs) or s.tangent(o) is not None:
                o = o.view_as(o)
            if wanted:
                if tuple(t.shape[1:]) != tuple(o.shape):
                    raise ConfigError(
                        f"{name}.jvp returned a tangent of shape {tuple(t.shape[1:])} for an output of shape "
                        f"{tuple(o.shape)}; each tangent must have its output's shape."
                    )
                s.attach(o, t)
        result.append(o)
    return tuple(result) if isinstance(out, tuple) else result[0]
