"""The rewritten softmax / log-softmax / cross-entropy against torch's, on values, jvps and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from fwdgrad.nn import functional as FG

# float64 inputs: the ops are mathematically identical, so only rounding separates them.
ATOL, RTOL = 1e-10, 1e-9


def _logits(scale: float = 3.0, n: int = 17, c: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * scale


PAIRS = [
    (FG.softmax, lambda x: torch.softmax(x, dim=-1)),
    (FG.log_softmax, lambda x: torch.log_softmax(x, dim=-1)),
    (lambda x: FG.logsumexp(x, dim=-1), lambda x: torch.logsumexp(x, dim=-1)),
]


@pytest.mark.parametrize("ours,ref", PAIRS)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_values_and_jvp_match_torch(ours, ref, scale):
    x = _logits(scale)
    v = torch.randn_like(x)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)
    (y0, t0), (y1, t1) = jvp(ours, (x,), (v,)), jvp(ref, (x,), (v,))
    torch.testing.assert_close(y0, y1, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(t0, t1, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("ours,ref", PAIRS)
def test_gradients_match_torch(ours, ref):
    x = _logits()
    w = torch.randn_like(ref(x))  # a random cotangent, so every output entry matters
    g0 = grad(lambda z: (ours(z) * w).sum())(x)
    g1 = grad(lambda z: (ref(z) * w).sum())(x)
    torch.testing.assert_close(g0, g1, atol=ATOL, rtol=RTOL)


def test_cross_entropy_values_jvp_grad_vmap():
    x = _logits()
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    v = torch.randn_like(x)
    torch.testing.assert_close(FG.cross_entropy(x, y), F.cross_entropy(x, y), atol=ATOL, rtol=RTOL)
    _, t0 = jvp(lambda z: FG.cross_entropy(z, y), (x,), (v,))
    _, t1 = jvp(lambda z: F.cross_entropy(z, y), (x,), (v,))
    torch.testing.assert_close(t0, t1, atol=ATOL, rtol=RTOL)
    g0 = grad(lambda z: FG.cross_entropy(z, y))(x)
    g1 = grad(lambda z: F.cross_entropy(z, y))(x)
    torch.testing.assert_close(g0, g1, atol=ATOL, rtol=RTOL)
    # vmap over a stack of 4 tangents gives the 4 individual jvps.
    vs = torch.randn(4, *x.shape, dtype=x.dtype)
    batched = vmap(lambda t: jvp(lambda z: FG.cross_entropy(z, y), (x,), (t,))[1])(vs)
    singles = torch.stack([jvp(lambda z: F.cross_entropy(z, y), (x,), (t,))[1] for t in vs])
    torch.testing.assert_close(batched, singles, atol=ATOL, rtol=RTOL)


def test_stable_for_logits_of_magnitude_1e4():
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [5e3, 1e4, 1e4]], dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    v = torch.ones_like(x)
    for out in (FG.softmax(x), FG.log_softmax(x), FG.cross_entropy(x, y),
                jvp(lambda z: FG.cross_entropy(z, y), (x,), (v,))[1],
                grad(lambda z: FG.cross_entropy(z, y))(x)):
        assert torch.isfinite(out).all()
    torch.testing.assert_close(FG.softmax(x), torch.softmax(x, -1))
    torch.testing.assert_close(FG.cross_entropy(x, y), F.cross_entropy(x, y))


def test_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        FG.cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class-index targets"):
        FG.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
