"""The tangent rules, one module per op family; importing this package registers them all.

==========================  =====================================================================
``linear``                  ``F.linear``, matmul/mm/bmm (batch-major GEMMs, rank-one weights)
``conv``                    ``conv2d`` (k weight tangents as extra output channels, rank-one kernels)
``pooling``                 max/avg pooling, ``amax``
``pointwise``               activations, exp/log/sqrt/trig/pow, arithmetic with broadcasting
``reductions``              sum/mean, logsumexp, (log-)softmax, cross-entropy
``normalization``           batch norm (training and eval), layer norm
``attention``               ``F.scaled_dot_product_attention`` (torch has no forward-mode rule for it)
``shape``                   view/reshape/transpose/index/gather/cat, dropout, ops with no tangent
``autograd_function``       custom ``torch.autograd.Function``s (their ``jvp``)
==========================  =====================================================================
"""

from fwdgrad.engine.rules import (
    attention,
    autograd_function,
    conv,
    linear,
    normalization,
    pointwise,
    pooling,
    reductions,
    shape,
)

__all__ = ["attention", "autograd_function", "conv", "linear", "normalization", "pointwise", "pooling", "reductions",
           "shape"]
