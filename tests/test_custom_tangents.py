"""Custom whole-vector tangents (frog's Sec. 4.3): their geometry exactly, E[v v^T] = I statistically where it is
claimed (variances from the maths, Z standard errors per entry), and how they are selected from configs.

For ``u`` uniform on the unit sphere in R^n: ``u_j^2 ~ Beta(1/2, (n-1)/2)``, so for ``v = sqrt(n) u``
``Var[v_j^2] = 2(n-1)/(n+2)`` and ``Var[v_i v_j] = n E[u_i^2 u_j^2] n = n/(n+2)`` (i != j).
"""

from __future__ import annotations

import math

import pytest
import torch
from estimator_problems import DT, Z, flat, mlp_problem, true_grad
from hydra.utils import instantiate

from fwdgrad import ForwardGradient
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import TANGENT_DISTRIBUTIONS, FixedAngle, StandardBasis, VaryingLength
from mnist_helpers import compose_cfg

SHAPES = {"w": (2, 2), "b": (1,)}  # n = 5, split over two tensors: the tangents must be joint over both
PARAMS = {name: torch.zeros(s, dtype=DT) for name, s in SHAPES.items()}


def _B(dist, k: int, seed: int = 0) -> torch.Tensor:
    """The k x n matrix of tangents a ForwardGradient with this distribution draws."""
    v = ForwardGradient(k, "mean", dist, seed=seed).sample_tangents(PARAMS)
    return torch.cat([t.reshape(k, -1) for t in v.values()], dim=1)


def test_registered_after_the_built_ins_with_their_defaults():
    assert list(TANGENT_DISTRIBUTIONS)[:3] == ["normal", "rademacher", "rank1"]
    assert str(TANGENT_DISTRIBUTIONS["angle"]) == "angle(angle=45)"
    assert str(TANGENT_DISTRIBUTIONS["varying_length"]) == "varying_length(max_length=2)"
    assert str(TANGENT_DISTRIBUTIONS["standard_basis"]) == "standard_basis"


@pytest.mark.parametrize("angle", [15.0, 60.0, 90.0])
def test_angle_tangents_have_the_angle_and_length_sqrt_n(angle):
    B = _B(FixedAngle(angle), 4, seed=1)
    n = B.shape[1]
    torch.testing.assert_close(B.norm(dim=1), torch.full((4,), math.sqrt(n), dtype=DT))
    cos = (B[1:] @ B[0]) / n
    torch.testing.assert_close(cos, torch.full((3,), math.cos(math.radians(angle)), dtype=DT))


def test_angle_zero_repeats_the_first_tangent():
    B = _B(FixedAngle(0), 3)
    torch.testing.assert_close(B[1:], B[:1].expand(2, -1))


def _second_moment_ok(samples: torch.Tensor, var: torch.Tensor) -> None:
    """Mean of v v^T over M draws equals I within Z standard errors per entry (``var``: each entry's variance)."""
    M, n = samples.shape
    est = torch.einsum("mi,mj->ij", samples, samples) / M
    err = (est - torch.eye(n, dtype=DT)).abs()
    se = (var / M).sqrt()
    assert bool((err <= Z * se + 1e-12).all()), (err / se).max()


def test_angle_tangents_have_identity_second_moment_each():
    """E[v_i v_i^T] = I for the first tangent and for a rotated one (each is sqrt(n) x uniform on the sphere)."""
    M, n = 3000, 5
    dist = FixedAngle(30)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([dist.flat(2, n, g, DT, torch.device("cpu")) for _ in range(M)])
    var = torch.full((n, n), n / (n + 2), dtype=DT)
    var.diagonal().fill_(2 * (n - 1) / (n + 2))
    for i in (0, 1):
        _second_moment_ok(draws[:, i], var)


def test_varying_length_tangents_are_orthogonal_coordinates_with_identity_second_moment():
    B = _B(VaryingLength(4.0), 3, seed=2)
    assert int((B != 0).sum()) == 3 and int((B != 0).sum(1).max()) == 1  # one coordinate each
    assert int((B != 0).any(0).sum()) == 3  # distinct coordinates: orthogonal
    n, m = 5, 4.0
    el2, el4 = (m**2 + m + 1) / 3, (m**5 - 1) / (5 * (m - 1))  # E[L^2], E[L^4] for L ~ U[1, m]
    lengths = B.abs().sum(1) / math.sqrt(n / el2)
    assert bool(((lengths >= 1) & (lengths <= m)).all())
    # v_j^2 = s^2 L^2 [J = j], s^2 = n / E[L^2]: E = 1, Var = n E[L^4] / E[L^2]^2 - 1; off-diagonal entries are 0
    M = 3000
    g = torch.Generator().manual_seed(4)
    draws = torch.stack([VaryingLength(m).flat(1, n, g, DT, torch.device("cpu"))[0] for _ in range(M)])
    var = torch.full((n, n), 1e-30, dtype=DT)
    var.diagonal().fill_(n * el4 / el2**2 - 1)
    _second_moment_ok(draws, var)


def test_standard_basis_with_sum_at_k_equal_n_is_the_exact_gradient():
    loss_fn, params = mlp_problem()
    n = sum(t.numel() for t in params.values())
    _, g = ForwardGradient(n, "sum", "standard_basis")(loss_fn, params)
    torch.testing.assert_close(flat(g), flat(true_grad(loss_fn, params)), rtol=1e-10, atol=1e-12)
    B = _B(StandardBasis(), 3)
    torch.testing.assert_close(B, torch.eye(3, 5, dtype=DT))


@pytest.mark.parametrize("dist", ["varying_length", "standard_basis"])
def test_more_tangents_than_coordinates_is_a_config_error(dist):
    with pytest.raises(ConfigError, match=r"num_tangents <= n.*k=6, n=5"):
        _B(dist, 6)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="angle must be a number of degrees in \\[0, 180\\]"):
        FixedAngle(200)
    with pytest.raises(ConfigError, match="max_length must be a number >= 1"):
        VaryingLength(0.5)
    with pytest.raises(ConfigError, match="distribution must be a registered name"):
        ForwardGradient(distribution=3.0)


def test_selected_from_the_real_configs_with_their_settings():
    cfg = compose_cfg("mnist_fwdgrad", ["gradient=forward_angle", "gradient.distribution.angle=30"])
    est = instantiate(cfg.gradient)
    assert est.describe()["distribution"] == "angle(angle=30)" and est.num_tangents == 4
    cfg = compose_cfg("global_optim", ["gradient.distribution=varying_length"])
    assert instantiate(cfg.gradient).describe()["distribution"] == "varying_length"
    node = "{_target_:fwdgrad.estimators.VaryingLength,max_length:8}"
    cfg = compose_cfg("global_optim", [f"gradient.distribution={node}"])
    assert instantiate(cfg.gradient).tangent_distribution.max_length == 8
