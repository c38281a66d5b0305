"""Tangent data types, and the helpers every rule uses on the dense tangent layout.

Tangent layout
--------------
The tangent of a primal of shape ``S`` is a tensor of shape ``(k, *S)`` ("k-major", like ``vmap``), but it
may be a strided view of a *batch-major* buffer of shape ``(B, k, *S[1:])`` (linear and conv layers produce
those, see :mod:`fwdgrad.engine.rules.linear`). Rules index the k-major view and never assume contiguity;
a rule that can use a batch-major layout checks for it (:func:`batch_major_rows`).

A parameter's tangents may also be given as :class:`RankOne` factors or as :class:`Regenerated` tangents;
:func:`dense` materialises either where a rule has no special path for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fwdgrad.errors import Unsupported

__all__ = [
    "RankOne", "Regenerated", "Tangent", "aligned", "batch_major_rows", "dense", "full", "insert_after_k",
    "k_of", "tangent_slice", "tdim", "tdims", "zero_like_tangent",
]


@dataclass
class RankOne:
    """k rank-one tangents ``u_i v_i^T`` of a parameter of shape ``shape`` (``len(shape) >= 2``).

    ``u`` is ``(k, shape[0])`` and ``v`` is ``(k, prod(shape[1:]))``. With u, v ~ N(0, I) independent,
    ``vec(u v^T) = v (x) u`` has ``E[(v (x) u)(v (x) u)^T] = E[v v^T] (x) E[u u^T] = I``: an unbiased tangent.
    """

    u: Tensor
    v: Tensor
    shape: Tuple[int, ...]
    _dense: Optional[Tensor] = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return self.u.shape[0]

    def dense(self) -> Tensor:
        """The k materialised tangents, ``(k, *shape)`` (cached: only ops without a rank-one rule need it)."""
        if self._dense is None:
            self._dense = torch.bmm(self.u.unsqueeze(2), self.v.unsqueeze(1)).view(self.k, *self.shape)
        return self._dense


class Regenerated:
    """k dense tangents that are not stored: ``make()`` regenerates them (from their seeds) at each use.

    A forward-mode pass uses each weight tangent once, so regenerating instead of keeping the whole tangent
    vector through the pass trades one more round of random numbers for a parameter-sized buffer.
    """

    def __init__(self, k: int, make: Callable[[], Tensor]) -> None:
        self.k = k
        self._make = make

    def dense(self) -> Tensor:
        return self._make()


Tangent = Union[Tensor, RankOne, Regenerated]


def tangent_slice(t: Tangent, i: int, j: int) -> Tangent:
    """Tangents ``i..j-1`` of ``t`` (views where possible)."""
    if isinstance(t, Tensor):
        return t[i:j]
    if isinstance(t, RankOne):
        return RankOne(t.u[i:j], t.v[i:j], t.shape)
    return Regenerated(j - i, lambda: t.dense()[i:j])


# ---------------------------------------------------------------------------------------------- helpers
def dense(t: Optional[Tangent]) -> Optional[Tensor]:
    """The ``(k, *shape)`` tensor of ``t`` (``None`` stays ``None``: no tangent, i.e. a zero tangent)."""
    return t if t is None or isinstance(t, Tensor) else t.dense()


def k_of(*ts: Optional[Tangent]) -> int:
    """The number of tangents k of the first tangent that is not ``None``."""
    for t in ts:
        if t is not None:
            return t.shape[0] if isinstance(t, Tensor) else t.k
    raise AssertionError("no tangent")  # pragma: no cover - callers check first


def full(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Broadcast the tangent ``t`` (``(k, *s)``) to the tangent shape of a primal of ``shape``."""
    shape = tuple(shape)
    if tuple(t.shape[1:]) == shape:
        return t
    extra = len(shape) - (t.dim() - 1)
    if extra > 0:  # right-align the primal dims, keep k in front
        t = t[(slice(None),) + (None,) * extra]
    return t.expand(t.shape[0], *shape)


def insert_after_k(t: Tensor, ndim: int) -> Tensor:
    """Insert singleton dims after k so the primal part of ``t`` has ``ndim`` dims (aligns batch dims)."""
    extra = ndim - (t.dim() - 1)
    return t[(slice(None),) + (None,) * extra] if extra > 0 else t


def aligned(t: Optional[Tangent], out: Tensor) -> Optional[Tensor]:
    """The dense tangent with singleton dims after k so that its primal part has ``out.dim()`` dims: then it
    broadcasts against any primal operand of a broadcasting op without k meeting a primal dim."""
    t = dense(t)
    return None if t is None else insert_after_k(t, out.dim())


def tdim(dim: int) -> int:
    """Primal dim -> tangent dim (negative dims count from the end, so only non-negative ones shift)."""
    return dim + 1 if dim >= 0 else dim


def tdims(dim: Any, ndim: int) -> Tuple[int, ...]:
    """Primal reduction dims (``None``: all ``ndim`` of them) -> tangent dims, negative ones counted on the
    primal's ``ndim`` dims. A 0-dim primal has no dim to reduce: its rule handles it first (an empty tuple would
    make torch reduce every dim, the tangents' k dim too)."""
    if ndim == 0:
        raise Unsupported("a reduction rule reached a 0-dim tensor")
    if dim is None:
        return tuple(range(1, ndim + 1))
    if isinstance(dim, (tuple, list)):
        return tuple(tdim(int(d) % ndim) for d in dim)
    return (tdim(int(dim) % ndim),)


def batch_major_rows(t: Tensor, n: int) -> Optional[Tensor]:
    """``(B*k, n)`` rows of a ``(k, *lead, n)`` tangent if it is batch-major in memory (a free view)."""
    moved = t.movedim(0, -2)  # (*lead, k, n)
    if moved.is_contiguous():
        return moved.view(-1, n)
    return None


def zero_like_tangent(k: int, x: Tensor) -> Tensor:
    """k zero tangents of the primal ``x`` (for an operand without tangent where one is needed)."""
    return x.new_zeros((k, *x.shape))
