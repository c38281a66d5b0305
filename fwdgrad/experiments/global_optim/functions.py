"""Classic optimisation test functions, each with its known global minima.

Every function maps a 1-D tensor ``x`` of shape ``(dim,)`` to a scalar and is written from plain tensor ops,
so it works under ``torch.func.jvp``/``vmap`` and backprop alike.

Speed under forward-mode AD
---------------------------
Some formulas read ``torch.add(a, b, alpha=c)`` (= a + c b) rather than ``a + c * b``. Under forward-mode AD
(``torch.func.jvp``, ``torch.autograd.forward_ad``) in torch 2.14 an elementwise add/sub/mul/div between a dual
tensor and a *plain* operand (a Python number or a constant tensor) is dispatched to the Python reference
implementation in ``torch._refs``, an order of magnitude slower per op on CPU than ops between two dual tensors,
``1.0 - x`` (rsub), ``x ** 2`` and scalar keyword arguments such as ``alpha``. On these tiny problems that overhead
dominates a forward-gradient step (docs/global_optim.md). The functions are the textbook formulas; tests/test_global_optim.py checks values, jvps and gradients against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["TestFunction", "Beale", "Rosenbrock", "Sphere", "StyblinskiTang"]


@dataclass
class TestFunction:
    """A test function: callable on ``x`` (shape ``(dim,)``), with its dimension, minima and a start point.

    ``start``: None (the function's default), a list of ``dim`` numbers, or ``{first: a, rest: b}`` for
    ``(a, b, ..., b)`` in any dimension (frog's starts: ``{first: -1, rest: 0}`` for Rosenbrock).
    """

    dim: int = 2
    start: Optional[Union[List[float], Mapping[str, float]]] = None
    #: Plot window for 2-D contour plots: ((xmin, xmax), (ymin, ymax)).
    bounds: Tuple[Tuple[float, float], Tuple[float, float]] = field(default=((-2.0, 2.0), (-2.0, 2.0)))

    __test__ = False  # not a pytest test class despite the name

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {self.dim!r}.")
        if isinstance(self.start, Mapping):
            self.start = _first_and_rest(self.start, self.dim)
        if self.start is not None:
            if isinstance(self.start, (str, bytes)) or not isinstance(self.start, Sequence):
                raise ValueError(f"start must be a list of {self.dim} numbers (e.g. start=[1.0,1.5]), "
                                 f"got {self.start!r}.")
            if len(self.start) != self.dim:
                raise ValueError(
                    f"start has {len(self.start)} coordinates but dim={self.dim}; give one value per dimension "
                    "or leave start unset for the function's default."
                )
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in self.start):
                raise ValueError(f"start must be a list of finite numbers, got {list(self.start)!r}.")
            self.start = [float(v) for v in self.start]  # a plain list, also when given as an OmegaConf ListConfig

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def minima(self) -> List[List[float]]:
        """The global minimisers (one or more points)."""
        raise NotImplementedError

    @property
    def min_value(self) -> float:
        return float(self(torch.tensor(self.minima[0], dtype=torch.float64)))

    def default_start(self) -> List[float]:
        raise NotImplementedError

    def start_point(self, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.tensor(self.start if self.start is not None else self.default_start(), dtype=dtype)

    def distance_to_minimum(self, x: Tensor) -> float:
        """Euclidean distance from ``x`` to the nearest global minimiser."""
        x = x.detach().to(torch.float64)
        return min(float(torch.linalg.vector_norm(x - torch.tensor(m, dtype=torch.float64)))
                   for m in self.minima)

    def minima_tensor(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The global minimisers as one ``(num_minima, dim)`` tensor (for vectorised distances)."""
        return torch.tensor(self.minima, dtype=dtype)


def _first_and_rest(spec: Mapping[str, float], dim: int) -> List[float]:
    """``{first: a, rest: b}`` -> ``[a, b, ..., b]`` (``dim`` values)."""
    if set(spec) != {"first", "rest"}:
        raise ValueError(f"start as a mapping needs exactly the keys first and rest (start={{first: -1.0, rest: "
                         f"0.0}}), got {dict(spec)!r}.")
    return [spec["first"]] + [spec["rest"]] * (dim - 1)


@dataclass
class Beale(TestFunction):
    """Beale (2-D): (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2; minimum 0 at (3, 0.5)."""

    bounds: Tuple[Tuple[float, float], Tuple[float, float]] = ((-4.5, 4.5), (-4.5, 4.5))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim != 2:
            raise ValueError(f"Beale is 2-dimensional; got dim={self.dim}.")

    def __call__(self, x: Tensor) -> Tensor:
        a, b = x[0], x[1]
        return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2

    @property
    def minima(self) -> List[List[float]]:
        return [[3.0, 0.5]]

    def default_start(self) -> List[float]:
        return [1.0, 1.5]


@dataclass
class Rosenbrock(TestFunction):
    """Rosenbrock: sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2; minimum 0 at (1, ..., 1)."""

    bounds: Tuple[Tuple[float, float], Tuple[float, float]] = ((-2.0, 2.0), (-1.0, 3.0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim < 2:
            raise ValueError(f"Rosenbrock needs dim >= 2; got dim={self.dim}.")

    def __call__(self, x: Tensor) -> Tensor:
        r = x[1:] - x[:-1] ** 2
        s = 1.0 - x[:-1]
        return torch.add(s * s, r * r, alpha=100.0).sum()  # (1 - x_i)^2 + 100 r_i^2 (module docstring)

    @property
    def minima(self) -> List[List[float]]:
        return [[1.0] * self.dim]

    def default_start(self) -> List[float]:
        return [-1.5 if i % 2 == 0 else 2.0 for i in range(self.dim)]


@dataclass
class Sphere(TestFunction):
    """Sphere: sum_i x_i^2; minimum 0 at the origin."""

    def __call__(self, x: Tensor) -> Tensor:
        return (x**2).sum()

    @property
    def minima(self) -> List[List[float]]:
        return [[0.0] * self.dim]

    def default_start(self) -> List[float]:
        return [1.5] * self.dim


#: argmin of the 1-D Styblinski-Tang term t^4 - 16 t^2 + 5 t (root of 4t^3 - 32t + 5 = 0 near -2.9).
_ST_ARGMIN = -2.903534027771178


@dataclass
class StyblinskiTang(TestFunction):
    """Styblinski-Tang: 0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i); minimum ~ -39.166 dim at x_i = -2.9035."""

    bounds: Tuple[Tuple[float, float], Tuple[float, float]] = ((-5.0, 5.0), (-5.0, 5.0))

    def __call__(self, x: Tensor) -> Tensor:
        x2 = x * x
        total = torch.add(torch.add(x2 * x2, x2, alpha=-16.0), x, alpha=5.0).sum()  # sum x^4 - 16 x^2 + 5 x
        return torch.add(total, total, alpha=-0.5)  # total - total / 2 = total / 2 (module docstring)

    @property
    def minima(self) -> List[List[float]]:
        return [[_ST_ARGMIN] * self.dim]

    def default_start(self) -> List[float]:
        # Inside the global minimum's basin in every coordinate (the local one sits near +2.75).
        return [-0.5] * self.dim

