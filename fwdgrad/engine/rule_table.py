"""The one table of tangent rules: which torch function is computed by which rule.

A rule computes an op's primal output and hangs its tangents off it. It is called as
``rule(state, *args, **kwargs)`` with the op's own arguments and the pass's
:class:`~fwdgrad.engine.state.PassState`, and only when some argument carries tangents in that pass.

Rules join the table at import, through the decorators::

    @register(torch.exp, torch.Tensor.exp)
    def _exp(s, x): ...

    @register_each(torch.Tensor.view, torch.Tensor.reshape)   # one rule for several functions:
    def _reshape(func, s, x, *args): ...                        # it receives the function it computes

A function registered twice is an error (two rules for one op would make the engine's result depend on
import order). Aliases of one function object (``F.conv2d is torch.conv2d``) named in one call count once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

from fwdgrad.errors import ConfigError

__all__ = ["Rule", "lookup", "register", "register_each", "supported_functions"]

Rule = Callable[..., Any]

_RULES: Dict[Callable, Rule] = {}


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _add(funcs: Tuple[Optional[Callable], ...], make: Callable[[Callable], Rule]) -> None:
    unique = list({id(f): f for f in funcs if f is not None}.values())  # aliases count once
    taken = [f for f in unique if f in _RULES]
    if taken:  # checked before adding any: a rejected call leaves the table as it was
        names = ", ".join(f"{_name(f)} (rule {_name(_RULES[f])})" for f in taken)
        raise ConfigError(
            f"a tangent rule is registered twice for {names}: each torch function has one rule. Remove the "
            "duplicate registration, or extend the existing rule."
        )
    for f in unique:
        _RULES[f] = make(f)


def register(*funcs: Optional[Callable]) -> Callable[[Rule], Rule]:
    """Decorator: ``rule(state, *args, **kwargs)`` computes each of ``funcs`` (``None`` entries are skipped,
    for functions a torch version may lack)."""

    def deco(rule: Rule) -> Rule:
        _add(funcs, lambda f: rule)
        return rule

    return deco


def register_each(*funcs: Optional[Callable]) -> Callable[[Rule], Rule]:
    """Decorator for a rule shared by several functions: ``rule(func, state, *args, **kwargs)`` is registered
    for each ``func`` with ``func`` bound, so it knows which one it computes (no per-call state needed)."""

    def deco(rule: Rule) -> Rule:
        _add(funcs, lambda f: functools.partial(rule, f))
        return rule

    return deco


#: ``lookup(func)``: the rule for ``func``, or ``None`` (the dict's own ``get``: no Python frame per op).
lookup: Callable[[Callable], Optional[Rule]] = _RULES.get


def supported_functions() -> Tuple[str, ...]:
    """Names of the torch functions with a tangent rule (for error messages and the docs)."""
    return tuple(sorted({getattr(f, "__name__", str(f)) for f in _RULES}))
