"""Rules for shape, indexing and copy ops, dropout, and ops whose result has no tangent.

Shape and indexing ops are linear and act on each tangent alone: the tangent of the result is the same op
applied to the ``(k, *shape)`` tangent, with primal dims shifted by one
(:func:`~fwdgrad.engine.tangent_types.tdim`) so k stays in front.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register, register_each
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import dense, full, k_of, tdim, zero_like_tangent
from fwdgrad.errors import Unsupported

T = torch.Tensor


@register_each(T.view, T.reshape, torch.reshape, T.flatten, torch.flatten, T.squeeze, torch.squeeze,
               T.unsqueeze, torch.unsqueeze, T.contiguous, T.view_as, T.reshape_as, T.unflatten,
               torch.unflatten)
def _reshape(func: Callable, s: PassState, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Ops that only change the shape (element order unchanged): the tangent reshaped like the output."""
    if func is T.view and args and isinstance(args[0], torch.dtype):
        raise Unsupported("view as another dtype")
    out = func(x, *args, **kwargs)
    tx = dense(s.tangent(x))
    return s.attach(out, tx.reshape(tx.shape[0], *out.shape))


@register(T.transpose, torch.transpose)
def _transpose(s: PassState, x: Tensor, d0: int, d1: int) -> Tensor:
    out = torch.transpose(x, d0, d1)
    tx = dense(s.tangent(x))
    return s.attach(out, tx.transpose(tdim(d0 % x.dim()) if x.dim() else 0, tdim(d1 % x.dim()) if x.dim() else 0))


@register(T.t, torch.t)
def _t(s: PassState, x: Tensor) -> Tensor:
    tx = dense(s.tangent(x))
    return s.attach(torch.t(x), tx if x.dim() < 2 else tx.transpose(1, 2))


@register(T.T.__get__)
def _T(s: PassState, x: Tensor) -> Tensor:  # x.T: all dims reversed
    tx = dense(s.tangent(x))
    return s.attach(x.T, tx.permute(0, *range(x.dim(), 0, -1)))


@register(T.mT.__get__)
def _mT(s: PassState, x: Tensor) -> Tensor:  # x.mT: the last two dims swapped
    return s.attach(x.mT, dense(s.tangent(x)).transpose(-2, -1))


@register_each(T.unbind, torch.unbind, T.chunk, torch.chunk, T.split, torch.split, T.tensor_split,
               torch.tensor_split)
def _pieces(func: Callable, s: PassState, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """Ops that cut a tensor into views along ``dim``: the tangent cut the same way along ``tdim(dim)``.

    ``unbind(x, dim=0)``; ``chunk(x, chunks, dim=0)``, ``split(x, sizes, dim=0)``, ``tensor_split(x, indices,
    dim=0)``: the sizes argument (positional or by its name) is passed on as it came, the dim shifted past k.
    """
    kwargs = dict(kwargs)
    unbind = func in (T.unbind, torch.unbind)
    dim = kwargs.pop("dim", args[0 if unbind else 1] if len(args) > (0 if unbind else 1) else 0)
    sizes = () if unbind else args[:1]
    outs = func(x, *sizes, dim=dim, **kwargs)
    touts = func(dense(s.tangent(x)), *sizes, dim=tdim(dim % x.dim()), **kwargs)
    return type(outs)(s.attach(o, t) for o, t in zip(outs, touts))


@register(T.permute, torch.permute)
def _permute(s: PassState, x: Tensor, *dims: Any) -> Tensor:
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    out = x.permute(*dims)
    tx = dense(s.tangent(x))
    return s.attach(out, tx.permute(0, *[d % x.dim() + 1 for d in dims]))


@register(T.expand)
def _expand(s: PassState, x: Tensor, *sizes: Any) -> Tensor:
    out = x.expand(*sizes)
    return s.attach(out, full(dense(s.tangent(x)), out.shape))


@register(T.clone, torch.clone)
def _clone(s: PassState, x: Tensor, *, memory_format: Any = torch.preserve_format) -> Tensor:
    return s.attach(torch.clone(x, memory_format=memory_format), dense(s.tangent(x)).clone())


@register_each(T.to, T.float, T.double, T.half, T.bfloat16, T.type_as)
def _to(func: Callable, s: PassState, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    out = func(x, *args, **kwargs)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        return out
    t = dense(s.tangent(x))
    return s.attach(out, t.to(device=out.device, dtype=out.dtype))


@register(T.__getitem__)
def _getitem(s: PassState, x: Tensor, idx: Any) -> Tensor:
    out = x[idx]
    items = idx if isinstance(idx, tuple) else (idx,)
    advanced = [i for i in items if isinstance(i, (Tensor, list))]
    if len(advanced) > 1:
        raise Unsupported("indexing with more than one index tensor")
    tx = dense(s.tangent(x))
    return s.attach(out, tx[(slice(None),) + items])


@register(T.gather, torch.gather)
def _gather(s: PassState, x: Tensor, dim: int, index: Tensor, *, sparse_grad: bool = False) -> Tensor:
    out = torch.gather(x, dim, index)
    tx = dense(s.tangent(x))
    k = tx.shape[0]
    # a negative dim counted on the primal's dims (on a 0-dim tensor, -1 would name the tangents' k dim)
    return s.attach(out, tx.gather(tdim(dim % max(x.dim(), 1)), index.unsqueeze(0).expand(k, *index.shape)))


@register_each(torch.cat, torch.concat, torch.stack)
def _cat(func: Callable, s: PassState, tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    out = func(tensors, dim)
    ts = [dense(s.tangent(t)) for t in tensors]
    k = k_of(*ts)
    ts = [zero_like_tangent(k, x) if t is None else t for x, t in zip(tensors, ts)]
    return s.attach(out, func(ts, tdim(dim)))


@register(F.dropout)
def _dropout(s: PassState, x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    tx = dense(s.tangent(x))
    if inplace:
        s.check_in_place(x, "dropout")
    if not training or p == 0.0:
        return s.attach(x.clone() if not inplace else x, tx)
    # one mask for the primal and all k tangents, as the derivative is taken at one point
    mask = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
    out = x.mul_(mask) if inplace else x * mask
    return s.attach(out, tx * mask)


@register_each(
    T.detach, torch.detach, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.rand_like, torch.randn_like, T.new_zeros, T.new_ones, T.new_empty, T.new_full, T.new_tensor,
    torch.sign, T.sign, torch.floor, T.floor, torch.ceil, T.ceil, torch.round, T.round,
)
def _no_tangent(func: Callable, s: PassState, *args: Any, **kwargs: Any) -> Any:
    """Ops whose output does not depend differentiably on the input (or not at all): no tangent."""
    return func(*args, **kwargs)
