"""The engine's tangents of a non-scalar output (``forward_tangents(..., vector=True)``, and the backends' ``vector``
flag): per-example losses and their directional derivatives against ``torch.func.jvp``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from fwdgrad.engine import forward_tangents
from fwdgrad.estimators import BackendDispatch, TangentMemoryPolicy
from fwdgrad.nn.functional import per_example_cross_entropy

DT = torch.float64


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 5, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT)}
    x = torch.randn(6, 5, generator=g, dtype=DT)
    y = torch.randint(0, 4, (6,), generator=g)

    def per_example(p):  # (2, 6): two rows of per-example losses
        logits = F.linear(torch.tanh(x), p["w"], p["b"])
        return torch.stack([per_example_cross_entropy(logits, y), (logits * logits).sum(1)])

    k = 3
    tangents = {n: torch.randn(k, *t.shape, generator=g, dtype=DT) for n, t in params.items()}
    return per_example, params, tangents, k


def _reference(fn, params, tangents, k):
    names = list(params)
    f = lambda *xs: fn(dict(zip(names, xs)))  # noqa: E731
    return torch.stack([jvp(f, tuple(params[n] for n in names), tuple(tangents[n][i] for n in names))[1]
                        for i in range(k)])


def test_vector_output_tangent_equals_torch_func():
    fn, params, tangents, k = _problem()
    out, d = forward_tangents(fn, params, tangents, k, vector=True)
    assert out.shape == (2, 6) and d.shape == (k, 2, 6)
    torch.testing.assert_close(out, fn(params))
    torch.testing.assert_close(d, _reference(fn, params, tangents, k), atol=1e-12, rtol=1e-10)


def test_vector_output_without_tangent_is_zero_and_scalar_calls_are_unchanged():
    fn, params, tangents, k = _problem()
    _, d = forward_tangents(lambda p: fn(p).detach(), params, tangents, k, vector=True)
    assert d.shape == (k, 2, 6) and not d.any()
    loss, d = forward_tangents(lambda p: fn(p).sum(), params, tangents, k)
    assert loss.dim() == 0 and d.shape == (k,)
    torch.testing.assert_close(d, _reference(fn, params, tangents, k).sum((1, 2)))


@pytest.mark.parametrize("backend", ["fast", "func"])
@pytest.mark.parametrize("budget", [256.0, 1e-6])  # 1e-6 MiB: one tangent per pass, concatenated
def test_backends_return_the_tangent_of_a_vector_output(backend, budget):
    fn, params, tangents, k = _problem()
    out, d = BackendDispatch(backend)(fn, params, tangents, k, TangentMemoryPolicy(k, False, budget), vector=True)
    torch.testing.assert_close(d, _reference(fn, params, tangents, k), atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="scalar"):  # without the flag a vector loss is still refused
        BackendDispatch(backend)(fn, params, tangents, k, TangentMemoryPolicy(k, False, budget))
