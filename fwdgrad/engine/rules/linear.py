"""Rules for linear layers and matrix products.

Batch-major GEMMs
-----------------
Linear (and conv) layers produce *batch-major* tangents, ``(B, k, m)`` in memory seen as ``(k, B, m)``,
because then all k tangents of a layer are ONE matrix product:

    linear  y = x W^T + b:      y_dot_i = x_dot_i W^T  +  x W_dot_i^T  +  b_dot_i
        x_dot W^T     : rows (B*k, n) @ W^T                     one GEMM, (B*k) x n x m
        x W_dot^T     : x (B, n) @ [W_dot_1; ...; W_dot_k]^T     one GEMM, B x n x (k*m), lands as (B, k, m)

With k > 1 dense weight tangents the second product is one *batched* GEMM instead, tangent-major
``(k, B, m)``, which was faster than one GEMM over k*m columns of a transposed operand (docs/performance.md).

Rank-one weight tangents
------------------------
A weight tangent may be a :class:`~fwdgrad.engine.tangent_types.RankOne` ``W_dot_i = u_i v_i^T`` (u_i in R^m,
v_i in R^n). Its linear tangent never forms the m x n matrix:

    x W_dot_i^T = x v_i u_i^T = (x v_i) u_i^T        O(B (m + n)) instead of O(B m n).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import RankOne, batch_major_rows, dense, insert_after_k, k_of

T = torch.Tensor


@register(F.linear)
def _linear(s: PassState, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    out = F.linear(x, weight, bias)
    tx, tw, tb = s.tangent(x), s.tangent(weight), s.tangent(bias)
    if tx is None and tw is None and tb is None:
        return out
    k = k_of(tx, tw, tb)
    m, n = out.shape[-1], x.shape[-1]
    lead = tuple(out.shape[:-1])
    rows = math.prod(lead)
    x2 = x.reshape(rows, n)
    acc: Optional[Tensor] = None  # batch-major accumulator (rows, k, m), a buffer we own
    tb = dense(tb)
    if isinstance(tw, RankOne):
        # x (u v^T)^T = (x v) u^T for each of the k tangents: (rows, k) x (k, m), never an m x n matrix.
        sv = (x2 @ tw.v.T).unsqueeze(2)
        acc = sv * tw.u if tb is None else torch.addcmul(tb, sv, tw.u)  # + b_dot fused into the same pass
        tb = None
    elif tw is not None and k > 1:
        return s.attach(out, _dense_weights_tangent_major(x2, weight, dense(tw), tx, tb, k, lead))
    elif tw is not None:
        # one dense weight tangent (k = 1): x @ W_dot^T, kept batch-major as (rows, 1, m).
        w_rows = dense(tw).reshape(k * m, n).T
        acc = (x2 @ w_rows if tb is None else torch.addmm(tb.reshape(1, k * m), x2, w_rows)).view(rows, k, m)
        tb = None
    if tx is not None:
        tx = dense(tx)
        r = batch_major_rows(tx, n)
        if r is not None:  # x_dot W^T as one GEMM over all rows*k tangent rows
            if acc is None:
                acc = (r @ weight.T).view(rows, k, m)
            else:
                acc.view(rows * k, m).addmm_(r, weight.T)
        else:
            part = (tx.reshape(k * rows, n) @ weight.T).view(k, rows, m).transpose(0, 1)
            acc = part if acc is None else acc.add_(part)
    if tb is not None:
        acc = tb.expand(rows, k, m) if acc is None else acc.add_(tb)
    assert acc is not None
    return s.attach(out, acc.transpose(0, 1).reshape(k, *lead, m))


def _dense_weights_tangent_major(
    x2: Tensor, weight: Tensor, tw: Tensor, tx: Optional[Tensor], tb: Optional[Tensor], k: int, lead: tuple
) -> Tensor:
    """k > 1 dense weight tangents: ``x @ W_dot_i^T`` for all i as one batched GEMM, tangent-major
    ``(k, rows, m)``, with ``x_dot W^T`` and ``b_dot`` added in place."""
    rows, n = x2.shape
    m = weight.shape[0]
    acc_t = torch.matmul(x2, tw.reshape(k, m, n).transpose(1, 2))
    if tx is not None:
        txd = dense(tx).reshape(k, rows, n)
        if txd.is_contiguous():  # tangent-major input: x_dot W^T as one GEMM over k*rows rows, fused add
            acc_t.view(k * rows, m).addmm_(txd.view(k * rows, n), weight.T)
        else:
            acc_t.add_(torch.matmul(txd, weight.T))
    if tb is not None:
        acc_t.add_(tb.reshape(k, 1, m))
    return acc_t.view(k, *lead, m)


@register(torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm)
def _matmul(s: PassState, a: Tensor, b: Tensor) -> Tensor:
    out = torch.matmul(a, b)
    ta, tb = dense(s.tangent(a)), dense(s.tangent(b))
    # d(a b) = a_dot b + a b_dot. Promote vectors to matrices as matmul does (row / column), then give each
    # tangent singleton batch dims after k, so that k never broadcasts against a primal batch dim.
    a1 = a if a.dim() >= 2 else a.unsqueeze(0)
    b1 = b if b.dim() >= 2 else b.unsqueeze(-1)
    nd = max(a1.dim(), b1.dim())
    t = None
    if ta is not None:
        ta1 = ta if a.dim() >= 2 else ta.unsqueeze(1)
        t = torch.matmul(insert_after_k(ta1, nd), b1)
    if tb is not None:
        tb1 = tb if b.dim() >= 2 else tb.unsqueeze(-1)
        part = torch.matmul(a1, insert_after_k(tb1, nd))
        t = part if t is None else t + part
    return s.attach(out, t.reshape(t.shape[0], *out.shape))
