"""fwdgrad: training neural networks without backpropagation, with forward gradients.

Public API::

    from fwdgrad import ForwardGradient, Backprop
    est = ForwardGradient(num_tangents=1, aggregation="mean", distribution="normal", seed=0)
    loss, grads = est(loss_fn, params)
"""

from fwdgrad.estimators import (
    AGGREGATIONS,
    BACKENDS,
    TANGENT_DISTRIBUTIONS,
    Backprop,
    ForwardGradient,
    GradientEstimator,
    cosine_similarity,
    estimate_module_grads,
    kept_prefix,
    total_numel,
)
from fwdgrad import functional

__all__ = [
    "AGGREGATIONS",
    "BACKENDS",
    "TANGENT_DISTRIBUTIONS",
    "Backprop",
    "ForwardGradient",
    "GradientEstimator",
    "cosine_similarity",
    "estimate_module_grads",
    "functional",
    "kept_prefix",
    "total_numel",
]
__version__ = "0.1.0"
