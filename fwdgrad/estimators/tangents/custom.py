"""Custom tangents over the whole parameter vector (Fluegel et al. 2024, Sec. 4.3; frog's samplers).

Each draws the k tangents as one ``(k, n)`` matrix over the concatenated, flattened parameters (so "orthogonal"
and "angle" mean over the whole vector, not per tensor) and splits it into per-parameter ``(k, *shape)``
tangents. They are registered tangent distributions (``gradient.distribution=angle`` etc. use the defaults
below); another setting is an object, e.g. on the command line
``gradient.distribution={_target_:fwdgrad.estimators.FixedAngle,angle:30}`` or ``gradient=forward_angle
gradient.distribution.angle=30``.

Unbiasedness of the mean needs ``E[v_i v_i^T] = I`` for each tangent (``E[(1/k) sum d_i v_i] = (1/k) sum
E[v_i v_i^T] grad f``); each class says whether it holds. frog draws unit-length angle tangents and lengths in
[1, max_length]; here they are scaled so that ``E[v v^T] = I`` like every other distribution of this project
(directions, cosines and the projection are unchanged; a mean step is larger by the constant factor).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Dict, Mapping, Tuple

import torch
from torch import Tensor

from fwdgrad.engine import Tangent
from fwdgrad.errors import ConfigError
from fwdgrad.estimators.tangents.distributions import (
    DrawContext,
    TangentDistribution,
    TangentDraw,
    register_distribution,
)

__all__ = ["JointDistribution", "FixedAngle", "VaryingLength", "StandardBasis"]


class JointDistribution(TangentDistribution):
    """Tangents defined jointly over the whole parameter vector: a ``(k, n)`` matrix, split per parameter."""

    #: the registered name of the family (what :meth:`__str__` starts with)
    family: str = "joint"

    @abstractmethod
    def flat(self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ``(k, n)`` tangent matrix ``B^T`` (rows are tangents)."""

    def options(self) -> Dict[str, float]:
        """The family's settings (e.g. ``{"angle": 30.0}``), for describe() and tables."""
        return {}

    def draw(self, params: Mapping[str, Tensor], k: int, ctx: DrawContext) -> TangentDraw:
        tensors = list(params.values())
        n = sum(t.numel() for t in tensors)
        device = tensors[0].device
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = self.flat(k, n, ctx.generator(device), dtype, device)
        tangents: Dict[str, Tangent] = {}
        for (name, t), block in zip(params.items(), torch.split(flat, [t.numel() for t in tensors], dim=1)):
            tangents[name] = block.to(device=t.device, dtype=t.dtype).contiguous().view(k, *t.shape)
        return TangentDraw(tangents, n=n)

    def sample(self, shape: Tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
        k, numel = shape[0], math.prod(shape[1:])
        return self.flat(k, numel, generator, dtype, device).view(shape)

    def __str__(self) -> str:
        opts = ", ".join(f"{key}={value:g}" for key, value in self.options().items())
        return f"{self.family}({opts})" if opts else self.family

    __repr__ = __str__


@register_distribution("angle")
class FixedAngle(JointDistribution):
    """k tangents at a fixed angle to the first (frog's ``specific_angle``): ``v_1 = sqrt(n) b`` with ``b``
    uniform on the unit sphere, and ``v_i = sqrt(n) (cos(theta) b + sin(theta) w_i)`` for i >= 2, ``w_i`` the
    normalised rejection of an independent normal vector from ``b``.

    ``E[v_i v_i^T] = I`` for every i (``(b, w_i)`` is a uniformly random orthonormal pair, so ``cos b + sin w_i``
    is uniform on the sphere): the mean is unbiased; the tangents are dependent (angle theta to the first, cosine
    about ``cos^2 theta`` between two others). What it is for: how the angle between tangents affects the
    estimate at a fixed k (the projection depends only on their span, the mean on their alignment).
    frog treats ``angle=0`` as "leave the others independent"; here it means every tangent equals the first.
    """

    family = "angle"

    def __init__(self, angle: float = 45.0) -> None:
        if not isinstance(angle, (int, float)) or isinstance(angle, bool) or not 0 <= angle <= 180:
            raise ConfigError(f"angle must be a number of degrees in [0, 180] (frog uses 15..90), got {angle!r}.")
        self.angle = float(angle)

    def options(self) -> Dict[str, float]:
        return {"angle": self.angle}

    def flat(self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
        if k > 1 and n < 2:
            raise ConfigError(f"angle tangents need n >= 2 parameters for k > 1 tangents, got n={n}.")
        z = torch.randn(k, n, generator=generator, dtype=dtype, device=device)
        b = z[0] / torch.linalg.vector_norm(z[0])
        w = z[1:] - (z[1:] @ b).unsqueeze(1) * b  # rejection from b: orthogonal to it
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
        theta = math.radians(self.angle)
        rotated = math.cos(theta) * b + math.sin(theta) * w
        return torch.cat([b.unsqueeze(0), rotated]) * math.sqrt(n)


@register_distribution("varying_length")
class VaryingLength(JointDistribution):
    """Orthogonal tangents of different lengths (frog's ``varying_length``): k distinct random coordinate
    vectors ``e_J`` with lengths ``L ~ U[1, max_length]``, scaled by ``s = sqrt(n / E[L^2])``,
    ``E[L^2] = (M^2 + M + 1) / 3``.

    ``E[v v^T] = s^2 E[L^2] E[e_J e_J^T] = (n / E[L^2]) E[L^2] I / n = I``: the mean is unbiased. The span is k
    random coordinates, so ``projection`` is randomised coordinate descent (``E[P_U] = (k/n) I``) and ignores the
    lengths, which the mean does not: what it is for. Needs k <= n.
    """

    family = "varying_length"

    def __init__(self, max_length: float = 2.0) -> None:
        if not isinstance(max_length, (int, float)) or isinstance(max_length, bool) or not max_length >= 1:
            raise ConfigError(f"max_length must be a number >= 1 (lengths are uniform on [1, max_length]), got "
                              f"{max_length!r}.")
        self.max_length = float(max_length)

    def options(self) -> Dict[str, float]:
        return {"max_length": self.max_length}

    def flat(self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
        if k > n:
            raise ConfigError(f"varying_length needs num_tangents <= n (distinct coordinates); got k={k}, n={n}.")
        m = self.max_length
        lengths = 1 + (m - 1) * torch.rand(k, generator=generator, dtype=dtype, device=device)
        coords = torch.randperm(n, generator=generator, device=device)[:k]
        out = torch.zeros(k, n, dtype=dtype, device=device)
        out[torch.arange(k, device=device), coords] = lengths * math.sqrt(n / ((m * m + m + 1) / 3))
        return out


@register_distribution("standard_basis")
class StandardBasis(JointDistribution):
    """The first k standard basis vectors ``e_1..e_k`` of the flattened parameter vector (frog's
    ``standard_basis``; deterministic, nothing is drawn).

    Not unbiased for k < n: ``E[v v^T] = diag(1, .., 1, 0, .., 0)``, and only the first k coordinates (in
    parameter order) ever get a gradient. With ``sum`` and k = n it is exact, ``g = sum_i (d f / d x_i) e_i =
    grad f``: forward-mode AD's n passes, for checks and small problems. Needs k <= n.
    """

    family = "standard_basis"

    def flat(self, k: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
        if k > n:
            raise ConfigError(f"standard_basis needs num_tangents <= n (the basis has n vectors); got k={k}, n={n}.")
        return torch.eye(k, n, dtype=dtype, device=device)
