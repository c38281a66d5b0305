"""The rule for ``F.scaled_dot_product_attention``, which torch's own forward-mode AD lacks.

torch 2.x has no forward-mode derivative for the fused attention kernels (``torch.func.jvp`` raises
NotImplementedError), so neither ``torch.func`` nor a fallback to it can differentiate a model that calls
``scaled_dot_product_attention`` (or ``nn.MultiheadAttention``, which calls it). This rule can. With
``S = scale * Q K^T + M`` (M the additive mask: 0, or -inf where a boolean mask or causality forbids),
``A = softmax(S)`` along the keys and ``O = A V``:

    S_dot = scale * (Q_dot K^T + Q K_dot^T)
    A_dot = A * (S_dot - sum_j A_j S_dot_j)
    O_dot = A_dot V + A V_dot

The primal output comes from torch's kernel; ``A`` is recomputed explicitly for the tangents (the k tangents
of each product are one batched matmul). Dropout on the attention weights would need the kernel's mask, and
grouped-query attention repeats heads: both are refused (:class:`~fwdgrad.errors.Unsupported`) rather than
approximated.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad.engine.rule_table import register
from fwdgrad.engine.state import PassState
from fwdgrad.engine.tangent_types import dense, insert_after_k
from fwdgrad.errors import Unsupported


def _attention_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float) -> Tensor:
    """``softmax(scale * q k^T + M)`` as the fused kernel defines it (its docstring's reference code)."""
    s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, dim=-1)


@register(F.scaled_dot_product_attention)
def _sdpa(
    s: PassState,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    if dropout_p != 0.0 or enable_gqa:
        raise Unsupported("scaled_dot_product_attention with dropout_p > 0 or enable_gqa")
    if s.tangent(attn_mask) is not None:
        raise Unsupported("scaled_dot_product_attention with a tangent-carrying attn_mask")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale=scale)
    tq, tk, tv = dense(s.tangent(query)), dense(s.tangent(key)), dense(s.tangent(value))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    a = _attention_weights(query, key, attn_mask, is_causal, scale)
    nd = out.dim()
    t: Optional[Tensor] = None
    if tq is not None or tk is not None:
        s_dot: Optional[Tensor] = None
        if tq is not None:
            s_dot = insert_after_k(tq, nd) @ key.transpose(-2, -1)
        if tk is not None:
            part = query @ insert_after_k(tk, nd).transpose(-2, -1)
            s_dot = part if s_dot is None else s_dot + part
        s_dot = s_dot * scale
        a_dot = a * (s_dot - (a * s_dot).sum(dim=-1, keepdim=True))
        t = a_dot @ value
    if tv is not None:
        part = a @ insert_after_k(tv, nd)
        t = part if t is None else t + part
    assert t is not None
    return s.attach(out, t.expand(t.shape[0], *out.shape) if t.shape[1:] != out.shape else t)
