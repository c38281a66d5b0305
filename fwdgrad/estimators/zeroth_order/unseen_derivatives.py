"""What finite differences cannot see: a derivative the loss defines otherwise than its values do.

Zeroth order differences the loss's *values*. Backprop (and the forward gradient, through a Function's ``jvp``)
follows the derivative the program *defines*, which differs from the values' derivative where

* a custom ``torch.autograd.Function`` defines its own (gradient reversal: +g where backprop gives -g; a
  straight-through estimator: the identity where the values' derivative is 0);
* a value computed from the parameters is detached (``p * p.detach()``: backprop's p, the values' 2p; the
  straight-through idiom ``x + (round(x) - x).detach()``), or computed under ``torch.no_grad()``.

:func:`unseen_derivatives` finds them in one recording pass with gradients on (the zeroth-order estimator runs
it once, before its first step): a TorchFunctionMode notes every detach and every no-grad op applied to a value
that depends on the parameters, and they are reported when undoing them changes backprop's gradient; the
custom Functions the loss calls have their backward compared with differences of their forward's values at the
very inputs they get (a Function that only fuses an op without forward-mode AD keeps the true derivative and is
not reported). Functions defined by torch itself (checkpointing and the like) are not checked.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fwdgrad.engine.mode import autograd_function_apply, function_apply_hook

__all__ = ["unseen_derivatives"]

_DETACHES = frozenset([Tensor.detach, torch.detach, Tensor.detach_, Tensor.data.__get__])


def _requires_grad(objs: Any) -> bool:
    for o in objs:
        if isinstance(o, Tensor) and o.requires_grad:
            return True
        if isinstance(o, (list, tuple)) and _requires_grad(o):
            return True
    return False


class _Watch(TorchFunctionMode):
    """Notes detaches and no-grad ops on values that depend on the parameters (they require grad here). With
    ``as_values``, it also undoes them: a detach becomes a copy that keeps the graph, a no-grad op runs with
    gradients on, so that backprop through the pass gives the derivative of the values. Every custom
    ``autograd.Function`` call (routed here by the engine's hook) has its backward checked against its forward
    values (:func:`_function_disagrees`)."""

    sees_autograd_functions = True

    def __init__(self, as_values: bool = False) -> None:
        super().__init__()
        self.as_values = as_values
        self.found: List[str] = []
        self.checked: Set[type] = set()  # custom Functions whose backward was compared with their values

    def _note(self, what: str) -> None:
        if what not in self.found:
            self.found.append(what)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is autograd_function_apply:
            cls, inputs = args[0], args[1:]
            self.checked.add(cls)
            if not cls.__module__.startswith("torch.") and _function_disagrees(cls, inputs, kwargs):
                self._note(f"custom autograd.Function {cls.__module__}.{cls.__qualname__} (its backward is not "
                           "the derivative of its forward's values)")
            return func(*args, **kwargs)
        depends = _requires_grad(args) or _requires_grad(kwargs.values())
        if not depends:
            return func(*args, **kwargs)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if func in _DETACHES:
            self._note(f"{name.replace('.__get__', '')} of a value computed from the parameters")
            if self.as_values:
                return args[0].clone()
        elif not torch.is_grad_enabled():
            self._note(f"{name} under torch.no_grad() on a value computed from the parameters")
            if self.as_values:
                with torch.enable_grad():
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


def _outputs(out: Any) -> List[Tensor]:
    return [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]


def _unchecked_functions(loss: Tensor, checked: Set[type]) -> List[str]:
    """Custom Functions (not torch's own) on the graph of ``loss`` that the hook never saw: called through a
    reference to ``apply`` taken before the check, so their backward could not be compared with their values."""
    names: List[str] = []
    seen: Set[int] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls not in checked and not cls.__module__.startswith("torch."):
            name = (f"custom autograd.Function {cls.__module__}.{cls.__qualname__} (called through a reference to "
                    "its apply taken earlier, so its backward could not be compared with its values)")
            if name not in names:
                names.append(name)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def _function_disagrees(cls: type, inputs: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether ``cls``'s backward, at these inputs, differs from the derivative of its forward's values.

    With random directions v (inputs) and u (outputs) from a generator of its own: ``<backward(u), v>`` against
    ``<u, (F(x + h v) - F(x - h v)) / 2h>`` with h = eps^(1/3) of the dtype (where a central difference's
    truncation and rounding errors balance). A mismatch beyond 10% of their size is no rounding: gradient
    reversal gives the opposite sign, a straight-through estimator the identity where the values' derivative is 0.
    """
    gen = torch.Generator().manual_seed(0)
    floats = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.is_floating_point()]
    if not floats:
        return False
    dtype = inputs[floats[0]].dtype
    h = torch.finfo(dtype).eps ** (1 / 3)
    v = {i: torch.randn(inputs[i].shape, generator=gen, dtype=inputs[i].dtype).to(inputs[i].device) for i in floats}

    def call(shift: float, grad: bool = False) -> Tuple[List[Tensor], List[Tensor]]:
        xs = list(inputs)
        leaves = []
        for i in floats:
            x = inputs[i].detach() + shift * v[i]
            xs[i] = x.requires_grad_(True) if grad else x
            leaves.append(xs[i])
        with torch.enable_grad() if grad else torch.no_grad():
            return _outputs(cls.apply(*xs, **kwargs)), leaves

    outs, leaves = call(0.0, grad=True)
    pairs = [(o, torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)) for o in outs
             if o.is_floating_point() and o.requires_grad]
    if not pairs:
        return False
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True)
    defined = sum(float((g * v[i]).sum()) for g, i in zip(grads, floats) if g is not None)
    plus, _ = call(h)
    minus, _ = call(-h)
    values = sum(float((u * (p - m)).sum()) / (2 * h) for (o, u), p, m in
                 zip(pairs, [p for p in plus if p.is_floating_point()], [m for m in minus if m.is_floating_point()]))
    return abs(defined - values) > 0.1 * (abs(defined) + abs(values)) + 1e-12


def _gradient(f: Callable[[Dict[str, Tensor]], Tensor], params: Dict[str, Tensor], watch: _Watch,
              replay: Callable[[], None]) -> Tuple[Optional[Tensor], List[Tensor]]:
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    replay()
    with function_apply_hook(), torch.enable_grad(), watch:
        loss = f(leaves)
    if not isinstance(loss, Tensor) or loss.grad_fn is None or loss.dim() != 0:
        return None, []
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves.values())]


def unseen_derivatives(f: Callable[[Dict[str, Tensor]], Tensor], params: Dict[str, Tensor],
                       replay: Callable[[], None] = lambda: None) -> List[str]:
    """The places where ``f``'s defined derivative differs from its values' (module docstring), in words;
    empty when finite differences estimate the same gradient backprop computes.

    A detach or a no-grad op counts only where it changes the gradient: the loss is differentiated twice, as
    defined and with those undone, and the two gradients compared to the dtype's rounding (a detached shift
    that cancels, as in a numerically stable log-sum-exp, changes nothing and is not reported). ``replay``
    restores the random state before each pass (the same dropout masks in both).
    """
    defined = _Watch()
    loss, g_defined = _gradient(f, params, defined, replay)
    if loss is None:
        return []
    functions = [w for w in defined.found if w.startswith("custom autograd.Function")]
    others = [w for w in defined.found if w not in functions]
    found = functions + _unchecked_functions(loss, defined.checked)
    if others:
        _, g_values = _gradient(f, params, _Watch(as_values=True), replay)
        tol = math.sqrt(torch.finfo(loss.dtype).eps)
        scale = max([float(g.abs().max()) for g in g_defined + g_values if g.numel()] + [1e-30])
        if any(float((a - b).abs().max()) > tol * scale for a, b in zip(g_defined, g_values) if a.numel()):
            found = others + found
    return found
