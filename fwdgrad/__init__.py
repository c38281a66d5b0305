"""fwdgrad: training neural networks without backpropagation, with forward gradients.

Public API::

    from fwdgrad import ForwardGradient, Backprop, ZerothOrder
    est = ForwardGradient(num_tangents=1, aggregation="mean", distribution="normal", seed=0)
    loss, grads = est(loss_fn, params)
    est = ZerothOrder(num_tangents=1, epsilon=1e-3, distribution="normal", aggregation="mean", seed=0)

New tangent distributions and aggregations join by a decorator, with no edit to the estimator::

    @fwdgrad.register_distribution("my_tangents")
    def my_tangents(shape, generator, dtype, device): ...        # (k, *param_shape), E[v v^T] = I

    @fwdgrad.register_aggregation("my_rule")
    def my_rule(x: fwdgrad.AggregationInput) -> Tensor: ...     # coefficients c of g = B c

Beyond weight perturbation: ``ForwardActivity`` (activity perturbation, FG-A) and ``LocalGuess`` (local-gradient
guesses) estimate from the model itself, through ``estimate_module_grads``; models built with
``local_losses=True`` train every block on its own loss whatever the estimator (:mod:`fwdgrad.nn.local_losses`).

The parts (tangents, rng, aggregation, regeneration, backends) are in :mod:`fwdgrad.estimators`.
"""

# Before anything imports torch: libgomp reads its spin setting once, when torch loads it (fwdgrad.perf.openmp).
from fwdgrad.perf.openmp import shorten_openmp_spin

shorten_openmp_spin()

from fwdgrad.estimators import (  # noqa: E402
    AGGREGATIONS,
    BACKENDS,
    TANGENT_DISTRIBUTIONS,
    AggregationInput,
    Backprop,
    ForwardActivity,
    ForwardGradient,
    GradientEstimator,
    LocalGuess,
    TangentDistribution,
    TangentDraw,
    ZerothOrder,
    aggregate,
    combine,
    cosine_similarity,
    estimate_module_grads,
    kept_prefix,
    register_aggregation,
    register_distribution,
    total_numel,
)
from fwdgrad.nn import functional  # noqa: E402

__all__ = [
    "AGGREGATIONS",
    "BACKENDS",
    "TANGENT_DISTRIBUTIONS",
    "AggregationInput",
    "Backprop",
    "ForwardActivity",
    "ForwardGradient",
    "GradientEstimator",
    "LocalGuess",
    "TangentDistribution",
    "TangentDraw",
    "ZerothOrder",
    "aggregate",
    "combine",
    "cosine_similarity",
    "estimate_module_grads",
    "functional",
    "kept_prefix",
    "register_aggregation",
    "register_distribution",
    "total_numel",
]
__version__ = "0.1.0"
