"""Softmax and cross-entropy rewritten from plain tensor operations.

Every function here is built only from elementwise ops, reductions and ``gather``, so it works under
``torch.func.jvp`` (forward mode), ``torch.func.vmap`` and ordinary backprop, on any device.

Numerical stability comes from the usual shift: for any constant ``m``,
``log sum_j exp(x_j) = m + log sum_j exp(x_j - m)``. With ``m = max_j x_j`` every exponent is <= 0, so
nothing overflows even for logits of magnitude 1e4. The shift is *detached*: the result does not depend on
``m`` (shift invariance), so its derivative with respect to ``m`` is exactly zero and there is no point in
propagating tangents through ``amax`` (whose derivative at ties is arbitrary anyway).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["log_softmax", "softmax", "logsumexp", "cross_entropy", "per_example_cross_entropy"]


def _shift(x: Tensor, dim: int) -> Tensor:
    """Detached per-slice maximum used to make ``exp`` overflow-free (see module docstring)."""
    return x.detach().amax(dim=dim, keepdim=True)


def logsumexp(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """``log(sum(exp(x), dim))``, stable for large ``|x|``.

    Derivative: d logsumexp(x) = sum_j softmax(x)_j dx_j, which autograd/forward-AD obtain from the
    ``exp``/``sum``/``log`` chain below; the detached shift contributes nothing (see module docstring).
    """
    m = _shift(x, dim)
    out = m + torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """``x - logsumexp(x)`` along ``dim``: log-probabilities, stable for large ``|x|``."""
    return x - logsumexp(x, dim=dim, keepdim=True)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """``exp(x) / sum(exp(x))`` along ``dim``, computed as ``e / e.sum()`` with ``e = exp(x - max x)``."""
    e = torch.exp(x - _shift(x, dim))
    return e / e.sum(dim=dim, keepdim=True)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (N, C) against class indices ``target`` (N,): the mean of
    :func:`per_example_cross_entropy`."""
    if logits.dim() != 2:
        raise ValueError(
            f"cross_entropy expects logits of shape (N, C), got {tuple(logits.shape)}; flatten extra "
            "dimensions in the model's forward."
        )
    return per_example_cross_entropy(logits, target).mean()


def per_example_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of every example, shape (*lead, N), of ``logits`` (*lead, N, C) against class indices
    ``target`` (N,), shared by any leading dims (e.g. the unit groups of a local loss, each with its logits).

    Uses ``CE_i = logsumexp(x_i) - x_{i, y_i}``, which never materialises the full (N, C) log-softmax.
    Its directional derivative is ``sum_j softmax(x_i)_j dx_ij - dx_{i, y_i}``, one per example (what
    estimators that work per example, such as activity perturbation, need).
    """
    if logits.dim() < 2:
        raise ValueError(f"cross_entropy expects logits of shape (N, C), got {tuple(logits.shape)}.")
    n = logits.shape[-2]
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(
            f"cross_entropy expects class-index targets of shape ({n},), got {tuple(target.shape)}."
        )
    index = target.long().unsqueeze(1).expand(*logits.shape[:-1], 1)
    picked = logits.gather(-1, index).squeeze(-1)
    return logsumexp(logits, dim=-1) - picked
