"""add_perturbation: z + eps at eps = 0, FG-A's entry into a pass; the fast engine skips the sum only for a
visibly zero eps and must agree with torch.func and with the plain sum everywhere."""

from __future__ import annotations

import torch
from torch.func import jvp

from fwdgrad.engine import add_perturbation, forward_tangents, zero_perturbation

DT = torch.float64


def _net(z0: torch.Tensor, w: torch.Tensor):
    def f(p):  # per-example outputs of relu(z0 + eps) @ w, then tanh(. + eps2)
        h = add_perturbation(z0, p["eps"]).relu() @ w
        return torch.tanh(add_perturbation(h, p["eps2"])).sum(1)
    return f


def test_fast_pass_matches_torch_func_for_zero_and_nonzero_perturbations():
    g = torch.Generator().manual_seed(0)
    z0, w = torch.randn(5, 4, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)
    u = {"eps": torch.randn(1, 5, 4, generator=g, dtype=DT), "eps2": torch.randn(1, 5, 3, generator=g, dtype=DT)}
    f = _net(z0, w)
    zero = {"eps": zero_perturbation(z0, (5, 4)), "eps2": zero_perturbation(z0, (5, 3))}
    nonzero = {"eps": 0.3 * torch.randn(5, 4, generator=g, dtype=DT), "eps2": torch.full((5, 3), 0.2, dtype=DT)}
    for eps in (zero, nonzero):
        out, d = forward_tangents(f, eps, u, 1, vector=True)
        ref_out, ref_d = jvp(f, ({k: v.contiguous() for k, v in eps.items()},), ({k: v[0] for k, v in u.items()},))
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d[0], ref_d, rtol=1e-12, atol=1e-12)
    # the nonzero case really moved the output (so it did not take the zero shortcut)
    assert not torch.allclose(forward_tangents(f, nonzero, u, 1, vector=True)[0],
                              forward_tangents(f, zero, u, 1, vector=True)[0])


def test_zero_shortcut_needs_a_visible_zero():
    z = torch.randn(3, 2, dtype=DT)
    assert zero_perturbation(z, (3, 2)).stride() == (0, 0)
    filled = torch.zeros((), dtype=DT).fill_(0.5).expand(3, 2)  # stride 0 but not zero: summed
    out, _ = forward_tangents(lambda p: add_perturbation(z, p["e"]), {"e": filled}, {"e": torch.ones(1, 3, 2, dtype=DT)}, 1,
                              vector=True)
    torch.testing.assert_close(out, z + 0.5)
    torch.testing.assert_close(add_perturbation(z, filled), z + 0.5)  # outside a pass: the plain sum


def test_zero_check_never_reads_an_element_off_the_cpu():
    # Reading a device tensor's element would wait for the device (a sync per layer and step); off the CPU the
    # check answers "not known to be zero" from metadata alone, so the pass computes the ordinary sum. A meta
    # tensor stands in for a device one: reading its element raises, so the check must not try.
    from fwdgrad.engine.injection import _is_zero

    z = torch.empty(3, 2, device="meta")
    eps = zero_perturbation(z, (3, 2))
    assert eps.stride() == (0, 0)
    assert _is_zero(eps, z) is False
    cpu = torch.zeros(3, 2)
    assert _is_zero(zero_perturbation(cpu, (3, 2)), cpu) is True
