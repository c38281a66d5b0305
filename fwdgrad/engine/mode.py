"""The forward-mode pass: a TorchFunctionMode that routes torch calls on tangent-carrying tensors to rules.

How it works
------------
``forward_tangents(fn, params, tangents, k)`` gives each parameter a fresh alias carrying its tangents as an
attribute and runs ``fn`` under a :class:`TangentMode`. Every torch call that touches a tensor with
tangents is routed to its rule (:mod:`fwdgrad.engine.registry`), which computes the primal output and its
tangents; calls that touch no tangent run untouched. An op without a rule whose result is floating point
raises :class:`~fwdgrad.errors.Unsupported`, and the estimator then falls back to ``torch.func`` (correct,
just slower). Because tangents hang off the primal tensors themselves, they die with them: like every
forward-mode pass, nothing is stored for later.

Everything a pass needs lives in its :class:`~fwdgrad.engine.state.PassState`, created per call and handed
to the rules: passes in two threads, or one pass inside another, never see each other's tangents.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fwdgrad.engine.registry import lookup
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangents import Tangent, dense
from fwdgrad.errors import Unsupported

__all__ = ["TangentMode", "forward_tangents", "func_name", "is_in_place"]

_IN_PLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
                            "xor", "lshift", "rshift")
) | {"__setitem__"}


class TangentMode(TorchFunctionMode):
    """Route every torch call on tensors carrying tangents of one pass to its rule (module docstring)."""

    def __init__(self, state: PassState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        state = self.state
        if not state.carries(args, kwargs):
            return func(*args, **kwargs)
        rule = lookup(func)
        if rule is not None:
            return rule(state, *args, **kwargs)
        return _without_rule(func, args, kwargs)


def func_name(func: Callable) -> str:
    """A torch function's qualified name, for messages."""
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def is_in_place(func: Callable, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``func`` writes into a tensor argument: ``x.add_``, ``x += y``, ``x[i] = y``, ``inplace=True``
    or ``out=`` (by name, so that it is known before the op runs)."""
    short = func_name(func).rsplit(".", 1)[-1]
    return (short.endswith("_") and not short.endswith("__")) or short in _IN_PLACE_DUNDERS or bool(
        kwargs.get("inplace", False)) or "out" in kwargs


def _without_rule(func: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Run an op that has no rule if its result cannot need a tangent; refuse it otherwise."""
    name = func_name(func)
    if is_in_place(func, kwargs):  # checked before running: a fallback must not see half-mutated tensors
        raise Unsupported(f"in-place op {name} on a tangent-carrying tensor")
    out = func(*args, **kwargs)
    if _has_float_tensor(out):
        raise Unsupported(f"no forward rule for {name}")
    return out  # shapes, comparisons, integer results: nothing to differentiate


def _has_float_tensor(out: Any) -> bool:
    if isinstance(out, Tensor):
        return out.is_floating_point() or out.is_complex()
    if isinstance(out, (list, tuple)):
        return any(_has_float_tensor(o) for o in out)
    return False


def forward_tangents(
    fn: Callable[[Dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    tangents: Mapping[str, Tangent],
    k: int,
    stats: Optional[Dict[str, float]] = None,
) -> Tuple[Tensor, Tensor]:
    """Evaluate ``fn(params)`` and its k directional derivatives along ``tangents`` in one forward pass.

    Args:
        fn: maps a dict of parameter tensors to a scalar.
        params: the point theta (``name -> Tensor``).
        tangents: per parameter ``(k, *shape)`` dense tangents, a :class:`~fwdgrad.engine.RankOne` or a
            :class:`~fwdgrad.engine.Regenerated`.
        k: the number of tangents.
        stats: if given, receives ``max_bytes_per_tangent``, the size of the largest intermediate tangent
            divided by k (what a caller needs to split k tangents into passes of bounded memory).

    Returns:
        ``(f(theta), d)`` with ``d[i] = <grad f(theta), V_i>`` (shape ``(k,)``), both detached.

    Raises:
        Unsupported: ``fn`` used an op on tangent-carrying tensors without a rule; call ``torch.func`` instead.
    """
    state = PassState(stats)
    aliases = {}
    for name, p in params.items():
        a = p.detach()  # a fresh tensor object: the tangent attribute never touches the caller's tensor
        setattr(a, state.attr, tangents[name])
        aliases[name] = a
    with torch.no_grad(), TangentMode(state):
        out = fn(aliases)
    t = state.tangent(out)
    if not isinstance(out, Tensor) or out.dim() != 0:
        return out, torch.zeros(0)  # the caller reports the non-scalar loss
    d = out.new_zeros(k) if t is None else dense(t).reshape(k)
    return out.detach(), d.detach()
