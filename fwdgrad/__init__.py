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

The parts (tangents, rng, aggregation, memory policy, backends) are in :mod:`fwdgrad.estimators`.

Importing fwdgrad changes nothing outside it: no environment variable, no torch attribute, no logging handler,
no matplotlib backend, no OmegaConf resolver; the public names load on first use. Its core needs torch alone;
the experiments (``fwdgrad.experiments``, ``fwdgrad.app``) need the ``experiments`` extra. Process settings
(OpenMP's spin, malloc) are opt-in, in :mod:`fwdgrad.perf`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time __getattr__ loads them
    from fwdgrad.estimators import (
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
    from fwdgrad.nn import functional

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


def __getattr__(name: str) -> Any:
    """Load the public names on first use (PEP 562), so that ``import fwdgrad.perf.openmp`` or
    ``import fwdgrad.app.process`` runs before torch is imported: an entry point can still opt in to a process
    setting that torch reads when it loads."""
    if name == "functional":
        from fwdgrad.nn import functional

        return functional
    if name in __all__:
        import fwdgrad.estimators as estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'fwdgrad' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
