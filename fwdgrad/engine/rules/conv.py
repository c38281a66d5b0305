"""The rule for 2-D convolutions.

Like a linear layer (:mod:`fwdgrad.engine.rules.linear`), all k tangents of a convolution are one
convolution each way, landing batch-major ``(B, k, out, Ho, Wo)``:

    x_dot (x) W   : x_dot as a batch of B*k images, one convolution with W
    x (x) W_dot   : the k weight tangents stacked as k*out output channels of one convolution

A rank-one kernel tangent ``W_dot_i = u_i v_i^T`` (v_i spanning ``in_channels * kh * kw``) gives

    conv(x, u_i v_i^T) = u_i (x) conv(x, v_i)

one convolution with k output channels instead of k * out.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import RankOne, dense, k_of
from fwdgrad.errors import Unsupported


@register(F.conv2d, torch.conv2d)
def _conv2d(
    s: PassState,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    tx, tw, tb = s.tangent(x), s.tangent(weight), s.tangent(bias)
    if tx is None and tw is None and tb is None:
        return out
    if x.dim() != 4:
        raise Unsupported("conv2d on an unbatched (C, H, W) input")
    k = k_of(tx, tw, tb)
    bsz, cout, ho, wo = out.shape
    conv = lambda inp, w: F.conv2d(inp, w, None, stride, padding, dilation, groups)  # noqa: E731
    acc: Optional[Tensor] = None  # batch-major (B, k, out, Ho, Wo)
    if isinstance(tw, RankOne) and groups == 1:
        # conv(x, u v^T) = u (x) conv(x, v): one conv with k output channels instead of k * out.
        z = conv(x, tw.v.view(k, *weight.shape[1:]))  # (B, k, Ho, Wo)
        acc = z.unsqueeze(2) * tw.u.view(1, k, cout, 1, 1)
    elif tw is not None:
        tw = dense(tw)
        if groups == 1:  # the k weight tangents as k*out output channels of one convolution
            acc = conv(x, tw.reshape(k * cout, *weight.shape[1:])).view(bsz, k, cout, ho, wo)
        else:  # channel groups would interleave wrongly when stacked: one conv per tangent
            acc = torch.stack([conv(x, tw[i]) for i in range(k)], dim=1)
    if tx is not None:
        tx = dense(tx)
        moved = tx.transpose(0, 1)  # (B, k, C, H, W)
        if moved.is_contiguous():
            part = conv(moved.reshape(bsz * k, *x.shape[1:]), weight).view(bsz, k, cout, ho, wo)
            acc = part if acc is None else acc.add_(part)
        else:
            part = conv(tx.reshape(k * bsz, *x.shape[1:]), weight).view(k, bsz, cout, ho, wo).transpose(0, 1)
            acc = part if acc is None else acc.add_(part)
    if tb is not None:
        tb = dense(tb).view(1, k, cout, 1, 1)
        acc = tb.expand(bsz, k, cout, ho, wo) if acc is None else acc.add_(tb)
    assert acc is not None
    return s.attach(out, acc.transpose(0, 1))
