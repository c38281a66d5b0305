"""The forward-mode pass: a TorchFunctionMode that routes torch calls on tangent-carrying tensors to rules.

How it works
------------
``forward_tangents(fn, params, tangents, k)`` gives each parameter a fresh alias carrying its tangents as an
attribute and runs ``fn`` under a :class:`TangentMode`. Every torch call that touches a tensor with
tangents is routed to its rule (:mod:`fwdgrad.engine.rule_table`), which computes the primal output and its
tangents; calls that touch no tangent run untouched. An op without a rule whose result is floating point
raises :class:`~fwdgrad.errors.Unsupported`, and the estimator then falls back to ``torch.func`` (correct,
just slower). Because tangents hang off the primal tensors themselves, they die with them: like every
forward-mode pass, nothing is stored for later.

Everything a pass needs lives in its :class:`~fwdgrad.engine.state.PassState`, created per call and handed
to the rules: passes in two threads, or one pass inside another, never see each other's tangents.

Custom ``torch.autograd.Function``s
-----------------------------------
``Function.apply`` never reaches a TorchFunctionMode (in torch 2.14 it is ``_C._FunctionBase.apply``, in
C++; it does not call ``__torch_function__``). The mode sees only the ops *inside* the Function's
``forward``, and differentiating those ignores the Function's own derivative: a gradient-reversal layer would
come out with the wrong sign, a straight-through estimator as zero. Two mechanisms make that impossible:

* While a pass runs (and only then: importing fwdgrad changes nothing in torch), ``torch.autograd.Function.apply``
  is :func:`autograd_function_apply` (:func:`function_apply_hook`, entered by :func:`forward_tangents` and left
  when the pass ends, in every outcome). It calls torch's own ``apply`` unchanged unless a tangent pass is
  running in the calling thread; then it dispatches the call through ``__torch_function__`` (like any torch
  function), and the mode's rule (:mod:`fwdgrad.engine.rules.autograd_function`) runs the Function's
  ``forward`` on the primals and its ``jvp`` on the tangents.
* A guard for calls that bypass the hook (a reference to ``apply`` taken before the pass began):
  torch's ``apply`` turns forward-mode AD off around ``forward`` (``torch._C._is_fwd_grad_enabled()`` is
  ``False`` there, and :func:`forward_tangents` turns it on for its pass). A tangent-carrying op seen while
  it is off is inside a Function's ``forward``: the mode raises :class:`~fwdgrad.errors.Unsupported`, so
  the estimator falls back to ``torch.func`` (which calls the ``jvp``) visibly instead of going wrong.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.overrides import TorchFunctionMode, handle_torch_function

from fwdgrad.engine.rule_table import lookup
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import Tangent, dense, full
from fwdgrad.errors import FwdgradError, Unsupported

__all__ = ["TangentMode", "autograd_function_apply", "forward_tangents", "func_name", "function_apply_hook",
           "is_in_place"]

#: Whether forward-mode AD is on in this thread (torch's ``apply`` turns it off around a Function's forward).
_fwd_grad_enabled = torch._C._is_fwd_grad_enabled

_IN_PLACE_DUNDERS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
                            "xor", "lshift", "rshift")
) | {"__setitem__"}


#: Queries of a tensor's metadata, never differentiable: run at once, without looking for tangents (the
#: loss calls ``x.dim()`` or ``x.shape`` a few times a pass; the general path for an op without a rule costs
#: several microseconds each). Method-wrappers of descriptors compare and hash by descriptor.
_METADATA = frozenset(
    [Tensor.dim, Tensor.size, Tensor.numel, Tensor.stride, Tensor.is_contiguous, Tensor.is_floating_point,
     Tensor.is_complex, Tensor.element_size]
    + [getattr(Tensor, a).__get__ for a in ("shape", "ndim", "dtype", "device", "requires_grad", "is_cuda", "layout")]
)


class TangentMode(TorchFunctionMode):
    """Route every torch call on tensors carrying tangents of one pass to its rule (module docstring)."""

    #: Custom ``autograd.Function`` calls reach this mode as :func:`autograd_function_apply` while
    #: :func:`function_apply_hook` is entered (any mode with this attribute True does).
    sees_autograd_functions = True

    def __init__(self, state: PassState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _METADATA:
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        state = self.state
        if not state.carries(args, kwargs):
            return func(*args, **kwargs)
        if not _fwd_grad_enabled():  # inside the forward of a custom Function that bypassed the hook
            raise Unsupported(_inside_function_message())
        rule = lookup(func)
        if rule is not None:
            try:
                return rule(state, *args, **kwargs)
            except FwdgradError:
                raise
            except (TypeError, ValueError, IndexError, RuntimeError, ArithmeticError) as err:
                raise _rule_failed(func, args, kwargs, err) from err
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


def _rule_failed(func: Callable, args: Sequence[Any], kwargs: Mapping[str, Any], err: Exception) -> Exception:
    """The error to raise when a rule failed on a call: the op's own error if the op itself fails on these
    arguments (a mistake in the loss, reported as torch reports it), else :class:`Unsupported`: the rule does
    not take this call form (a keyword it names otherwise, a 0-dim input, an empty tensor...), so ``auto`` falls
    back to ``torch.func`` visibly instead of the call ending in a raw error from inside the engine."""
    name = func_name(func)
    if not is_in_place(func, kwargs):  # an in-place op is not run a second time
        try:
            func(*args, **kwargs)
        except Exception as own:  # the op itself refuses these arguments
            return own
    return Unsupported(f"the rule for {name} does not take this call ({type(err).__name__}: {err})")


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
    vector: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Evaluate ``fn(params)`` and its k directional derivatives along ``tangents`` in one forward pass.

    Args:
        fn: maps a dict of parameter tensors to a scalar (or, with ``vector``, to a tensor of any shape).
        params: the point theta (``name -> Tensor``).
        tangents: per parameter ``(k, *shape)`` dense tangents, a :class:`~fwdgrad.engine.RankOne` or a
            :class:`~fwdgrad.engine.Regenerated`.
        k: the number of tangents.
        stats: if given, receives ``max_bytes_per_tangent``, the size of the largest intermediate tangent
            divided by k (what a caller needs to split k tangents into passes of bounded memory).
        vector: ``fn``'s output may have any shape S; ``d`` is then its tangent, shape ``(k, *S)``:
            ``d[i] = J V_i`` with J the Jacobian of the output (e.g. one directional derivative per example
            of a vector of per-example losses).

    Returns:
        ``(f(theta), d)`` with ``d[i] = <grad f(theta), V_i>`` (shape ``(k,)``), both detached; with
        ``vector``, ``d[i] = J V_i`` (shape ``(k, *S)``).

    Raises:
        Unsupported: ``fn`` used an op on tangent-carrying tensors without a rule; call ``torch.func`` instead.
        ConfigError: ``fn`` calls a custom ``torch.autograd.Function`` that has no ``jvp``.
    """
    state = PassState(stats)
    aliases = {}
    for name, p in params.items():
        a = p.detach()  # a fresh tensor object: the tangent attribute never touches the caller's tensor
        setattr(a, state.attr, tangents[name])
        aliases[name] = a
    state.params = frozenset(id(a) for a in aliases.values())
    # forward-mode AD on for the pass (also under inference_mode): only a custom Function's forward turns it
    # off, which is how the mode recognises ops inside one (module docstring).
    with function_apply_hook(), torch.no_grad(), _set_fwd_grad_enabled(True), TangentMode(state):
        out = fn(aliases)
    t = state.tangent(out)
    if vector and isinstance(out, Tensor):
        d = out.new_zeros((k, *out.shape)) if t is None else full(dense(t), out.shape)
        return out.detach(), d.detach()
    if not isinstance(out, Tensor) or out.dim() != 0:
        return out, torch.zeros(0)  # the caller reports the non-scalar loss
    d = out.new_zeros(k) if t is None else dense(t).reshape(k)
    return out.detach(), d.detach()


# ------------------------------------------------------------------------ custom autograd.Functions
#: torch's own ``Function.apply`` descriptor (a C method in torch 2.14, a Python classmethod in older versions),
#: read once; the hook below puts it back when the last pass ends.
_TORCH_APPLY = torch.autograd.Function.__dict__["apply"]


def autograd_function_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``torch.autograd.Function.apply`` while a pass runs (module docstring).

    Without a mode that ``sees_autograd_functions`` (a :class:`TangentMode`, or zeroth order's recording pass) on
    this thread's mode stack it is torch's ``apply``, unchanged, for the cost of one more C call (the stack's
    length). With one, it dispatches through ``__torch_function__`` with itself as the function, so the pass
    routes the call to the rule registered for it; other modes above the pass see it too, and reach the pass by
    calling it again.
    """
    n = torch._C._len_torch_function_stack()
    if n and any(getattr(torch._C._get_function_stack_at(i), "sees_autograd_functions", False) for i in range(n)):
        relevant = tuple(a for a in args if isinstance(a, Tensor)) + tuple(
            a for a in kwargs.values() if isinstance(a, Tensor))
        return handle_torch_function(autograd_function_apply, relevant, cls, *args, **kwargs)
    return _TORCH_APPLY.__get__(None, cls)(*args, **kwargs)


class _ApplyHook:
    """How many passes (in any thread) are running: the hook is installed by the first and removed by the last."""

    lock = threading.Lock()
    depth = 0


@contextlib.contextmanager
def function_apply_hook() -> Iterator[None]:
    """Make ``torch.autograd.Function.apply`` :func:`autograd_function_apply` for the duration of the block.

    Nested and concurrent blocks share one installation (counted); the last to leave restores torch's own
    descriptor, so outside every pass ``torch.autograd.Function.apply`` is exactly torch's. Another thread that
    calls ``apply`` meanwhile gets torch's behaviour through the wrapper (no pass runs on its mode stack).
    """
    with _ApplyHook.lock:
        if _ApplyHook.depth == 0:
            torch.autograd.Function.apply = classmethod(autograd_function_apply)  # type: ignore[assignment]
        _ApplyHook.depth += 1
    try:
        yield
    finally:
        with _ApplyHook.lock:
            _ApplyHook.depth -= 1
            if _ApplyHook.depth == 0:
                torch.autograd.Function.apply = _TORCH_APPLY  # type: ignore[assignment]


def _inside_function_message() -> str:
    classes = _running_function(inspect.currentframe())
    name = "a custom torch.autograd.Function"
    if classes:
        name = f"{classes[0].__module__}.{classes[0].__qualname__}"
    if len(classes) > 1:
        name += " (or a subclass sharing its forward)"
    return (
        f"an op on tangent-carrying tensors ran inside the forward of {name}, which was called without going "
        "through torch.autograd.Function.apply as a fwdgrad pass sees it (e.g. through a reference to apply "
        "taken before the pass began); the fast engine uses a Function's jvp only when the loss calls "
        "`MyFunction.apply(...)` itself"
    )


def _running_function(frame: Optional[FrameType]) -> List[type]:
    """The custom Functions whose ``forward`` runs in ``frame`` or one of its callers (base class first)."""
    codes: Dict[Any, List[type]] = {}
    todo = [torch.autograd.Function]
    while todo:
        for sub in todo.pop(0).__subclasses__():
            codes.setdefault(_forward_code(sub), []).append(sub)
            todo.append(sub)
    while frame is not None:
        if frame.f_code in codes:
            return codes[frame.f_code]
        frame = frame.f_back
    return []


def _forward_code(cls: type) -> Any:
    fwd = inspect.getattr_static(cls, "forward", None)
    fwd = fwd.__func__ if isinstance(fwd, staticmethod) else fwd
    return getattr(inspect.unwrap(fwd), "__code__", None) if callable(fwd) else None
