"""Gradient estimators: one interface for backprop and for forward gradients, built from small parts.

Every estimator is a callable ``est(loss_fn, params) -> (loss, grads)`` (:mod:`.base`). The forward gradient
(:mod:`.forward`) composes:

* :mod:`.tangents`: tangent distributions (a registry, ``@register_distribution``), the chunked draw layout
  and the drawn :class:`TangentDraw`;
* :mod:`.rng`: seeded-chunk random numbers (reproducible, parallel, independent of the thread count);
  :mod:`.tangents.counter`: ``counter_normal``, normal tangents from a counter-based generator, one compiled
  kernel parallel across torch's threads (another random stream than ``normal``'s);
* :mod:`.aggregation`: aggregations as coefficient rules ``c(d)`` with ``g = B c`` (a registry,
  ``@register_aggregation``) and :func:`combine`, which builds ``B c``;
* :mod:`.regeneration`: the memory policy (kept/regenerated tangents, tangent groups under a budget);
* :mod:`.selection`: aggregations that pick tangents by their ``d`` (max, max_normalized, mean_of_top_k);
* :mod:`.custom_tangents`: tangents over the whole vector (at a fixed angle, orthogonal of varying length,
  standard basis);
* :mod:`.backends`: the directional derivatives by the fast engine, ``torch.func`` or a backprop gradient
  ("simulated"), and the visible fallback;
* :mod:`.registry`: the registry class both registries are.

The zeroth-order estimator (:mod:`.zeroth_order`) uses the same tangents and aggregations with finite
differences instead of forward-mode AD: :mod:`.seeded_tangents` keeps its tangents as seeds, regenerated a chunk
at a time, and :mod:`.perturbation` evaluates the loss at ``theta + eps v`` without writing ``theta``.
Beyond weight perturbation: :mod:`.activity` (activity-perturbed forward gradients, FG-A, on the layers of
:mod:`.sites`), :mod:`.guess` (local-gradient guesses) and :mod:`.local` (how every estimator follows a model's
local losses); the first two are module-level estimators (:class:`ModuleEstimator`).
"""

from fwdgrad.estimators import selection  # noqa: F401  (registers its aggregations)
from fwdgrad.estimators.activity.forward_activity import ForwardActivity
from fwdgrad.estimators.aggregation import (
    AGGREGATIONS,
    Aggregation,
    AggregationInput,
    aggregate,
    combine,
    gram_matrix,
    register_aggregation,
    solve_gram,
)
from fwdgrad.estimators.backends import BACKENDS, BackendDispatch
from fwdgrad.estimators.base import (
    Backprop,
    DirectionalEstimator,
    GradientEstimator,
    LossFn,
    ModuleEstimator,
    OutputLoss,
    Params,
    as_param_dict,
    check_params,
    check_scalar_loss,
    check_seed,
    cosine_similarity,
    flatten,
    from_param_dict,
    total_numel,
)
from fwdgrad.estimators.forward import ForwardGradient
from fwdgrad.estimators.guess import LocalGuess
from fwdgrad.estimators.local import estimate_local_grads
from fwdgrad.estimators.memory_policy import (
    PASS_TENSORS,
    TangentMemoryPolicy,
    kept_prefix,
    predicted_peak,
    regeneration_pays,
)
from fwdgrad.estimators.module_grads import estimate_module_grads
from fwdgrad.estimators.registry import Registry
from fwdgrad.estimators.tangents.counter import CounterNormal
from fwdgrad.estimators.tangents.custom import FixedAngle, JointDistribution, StandardBasis, VaryingLength
from fwdgrad.estimators.tangents.distributions import (
    TANGENT_DISTRIBUTIONS,
    ChunkedDistribution,
    DrawContext,
    SamplerDistribution,
    TangentDistribution,
    TangentDraw,
    TangentSampler,
    register_distribution,
)
from fwdgrad.estimators.tangents.rng import ChunkedRNG
from fwdgrad.estimators.tangents.seeded import ChunkedTangent
from fwdgrad.estimators.zeroth_order.finite_differences import ZerothOrder

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "AggregationInput",
    "BACKENDS",
    "BackendDispatch",
    "Backprop",
    "ChunkedDistribution",
    "ChunkedRNG",
    "ChunkedTangent",
    "CounterNormal",
    "DirectionalEstimator",
    "DrawContext",
    "FixedAngle",
    "ForwardActivity",
    "ForwardGradient",
    "GradientEstimator",
    "JointDistribution",
    "LocalGuess",
    "LossFn",
    "ModuleEstimator",
    "OutputLoss",
    "PASS_TENSORS",
    "Params",
    "Registry",
    "SamplerDistribution",
    "StandardBasis",
    "TANGENT_DISTRIBUTIONS",
    "TangentDistribution",
    "TangentDraw",
    "TangentMemoryPolicy",
    "TangentSampler",
    "ZerothOrder",
    "VaryingLength",
    "aggregate",
    "as_param_dict",
    "check_params",
    "check_scalar_loss",
    "check_seed",
    "combine",
    "cosine_similarity",
    "estimate_local_grads",
    "estimate_module_grads",
    "flatten",
    "from_param_dict",
    "gram_matrix",
    "kept_prefix",
    "predicted_peak",
    "regeneration_pays",
    "register_aggregation",
    "register_distribution",
    "solve_gram",
    "total_numel",
]
