"""Rules for pooling and maxima.

A max is piecewise the identity on the selected entry: its tangent is the tangent at that entry (the
argmax the primal chose, so ties resolve as the primal's). Average pooling (fixed or adaptive windows) is
linear: the same pooling of the tangents.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import dense, tdim
from fwdgrad.errors import Unsupported

T = torch.Tensor


@register(F.max_pool2d, getattr(F, "max_pool2d_with_indices", None), getattr(F, "_max_pool2d", None))
def _max_pool2d(
    s: PassState,
    input: Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    tx = dense(s.tangent(input))
    if input.dim() != 4:
        raise Unsupported("max_pool2d on an unbatched (C, H, W) input")
    out, idx = F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    k = tx.shape[0]
    bsz, c, ho, wo = out.shape
    # The tangent at the selected entry of each window.
    moved = tx.transpose(0, 1)  # keep a batch-major layout batch-major
    if moved.is_contiguous():
        sel = moved.flatten(3).gather(3, idx.flatten(2).unsqueeze(1).expand(bsz, k, c, ho * wo))
        t = sel.view(bsz, k, c, ho, wo).transpose(0, 1)
    else:
        sel = tx.flatten(3).gather(3, idx.flatten(2).unsqueeze(0).expand(k, bsz, c, ho * wo))
        t = sel.view(k, bsz, c, ho, wo)
    s.attach(out, t)
    return (out, idx) if return_indices else out


@register(F.avg_pool2d, torch._C._nn.avg_pool2d)
def _avg_pool2d(s: PassState, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    out = F.avg_pool2d(input, *args, **kwargs)
    tx = dense(s.tangent(input))
    if input.dim() != 4:
        raise Unsupported("avg_pool2d on an unbatched input")
    k = tx.shape[0]
    t = F.avg_pool2d(tx.reshape(k * input.shape[0], *input.shape[1:]), *args, **kwargs)  # linear
    return s.attach(out, t.view(k, *out.shape))


@register(F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d)
def _adaptive_avg_pool2d(s: PassState, input: Tensor, output_size: Any) -> Tensor:
    out = F.adaptive_avg_pool2d(input, output_size)
    tx = dense(s.tangent(input))
    if input.dim() != 4:
        raise Unsupported("adaptive_avg_pool2d on an unbatched (C, H, W) input")
    k, bsz = tx.shape[0], input.shape[0]
    moved = tx.transpose(0, 1)  # linear: the same pooling of the B*k tangent images
    if moved.is_contiguous():  # batch-major (after a conv): pool it as it lies, and it stays batch-major
        t = F.adaptive_avg_pool2d(moved.reshape(bsz * k, *input.shape[1:]), output_size)
        return s.attach(out, t.view(bsz, k, *out.shape[1:]).transpose(0, 1))
    t = F.adaptive_avg_pool2d(tx.reshape(k * bsz, *input.shape[1:]), output_size)
    return s.attach(out, t.view(k, *out.shape))


@register(T.amax, torch.amax)
def _amax(s: PassState, x: Tensor, dim: Any = (), keepdim: bool = False) -> Tensor:
    out = torch.amax(x, dim=dim, keepdim=keepdim)
    if not isinstance(dim, int) and len(tuple(dim)) != 1:
        raise Unsupported("amax over several dims of a tangent-carrying tensor")
    tx = dense(s.tangent(x))
    if x.dim() == 0:  # a 0-dim tensor is its own maximum (and dim -1 would be the tangents' k dim below)
        return s.attach(out, tx)
    d = (dim if isinstance(dim, int) else tuple(dim)[0]) % x.dim()
    # the tangent of the maximum, shared evenly among tied maxima (as torch's amax derivative): the mean of the
    # tangents where x equals its maximum along d
    mask = (x == torch.amax(x, dim=d, keepdim=True)).to(tx.dtype)
    t = (tx * mask).sum(dim=tdim(d), keepdim=True) / mask.sum(dim=d, keepdim=True)
    return s.attach(out, t if keepdim else t.squeeze(tdim(d)))
