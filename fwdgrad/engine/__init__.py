"""The fast forward-mode engine: one forward pass carrying k tangents, with hand-written, batched rules.

``torch.func.jvp`` (and ``vmap`` over it for k tangents) is exact and general, but it pays for generality:
the decomposed ``linear`` rule materialises transposes, ReLU tangents go through ``threshold_backward``, and
with k tangents ``vmap`` re-batches every op. This engine computes the same directional derivatives

    d_i = <grad f(theta), V_i>,   i = 1..k,

in **one** forward pass, carrying all k tangents of every intermediate tensor at once, with rules written
for the layers that dominate the cost.

Layout: :mod:`~fwdgrad.engine.mode` (the TorchFunctionMode and :func:`forward_tangents`, how custom
``autograd.Function``s reach it), :mod:`~fwdgrad.engine.state` (per-pass state),
:mod:`~fwdgrad.engine.tangent_types` (tangent types and layout), :mod:`~fwdgrad.engine.rule_table` (the rule
table) and :mod:`~fwdgrad.engine.rules` (the rules, by op family).

Public interface, stable for the estimators: :func:`forward_tangents`, the tangent types :class:`RankOne`,
:class:`Regenerated`, ``Tangent``, :func:`tangent_slice`, :func:`supported_functions`,
:class:`~fwdgrad.errors.Unsupported`, and :func:`register` / :func:`register_each` for new rules.

Importing it changes nothing in torch: ``torch.autograd.Function.apply`` is routed to a custom Function's own
``jvp`` only while a pass runs (:func:`~fwdgrad.engine.mode.function_apply_hook`).
"""

from fwdgrad.engine import rules  # noqa: F401  (registers every rule)
from fwdgrad.engine.mode import forward_tangents
from fwdgrad.engine.injection import add_perturbation, zero_perturbation
from fwdgrad.engine.rule_table import register, register_each, supported_functions
from fwdgrad.engine.tangent_types import RankOne, Regenerated, Tangent, tangent_slice
from fwdgrad.errors import Unsupported

__all__ = ["RankOne", "Regenerated", "Tangent", "Unsupported", "add_perturbation", "forward_tangents", "register",
           "register_each", "supported_functions", "tangent_slice", "zero_perturbation"]
