"""Gradient estimators: one interface for backprop and for forward gradients.

Every estimator is a callable ``est(loss_fn, params) -> (loss, grads)`` where ``loss_fn`` maps the parameters
(a ``dict[str, Tensor]`` or a single ``Tensor``) to a scalar loss and ``grads`` has the structure of
``params``. The training loops never know which estimator they are driving.

Forward gradient (Baydin et al. 2022)
-------------------------------------
For a tangent ``v`` drawn with ``E[v v^T] = I`` the directional derivative ``d = <grad f, v>`` comes out of one
forward-mode pass (``torch.func.jvp``) alongside ``f`` itself, and

    g = d v = v v^T grad f,        E[g] = E[v v^T] grad f = grad f,

so ``g`` is an unbiased gradient estimate obtained without a backward pass.

Multiple tangents (Fluegel et al. 2024)
---------------------------------------
With ``k`` tangents ``v_1..v_k`` (the columns of ``B``, an ``n x k`` matrix over the *whole* concatenated
parameter vector) and ``d = B^T grad f`` (the k directional derivatives):

* ``mean``:       g = (1/k) sum_i d_i v_i = (1/k) B d       unbiased, variance / k
* ``sum``:        g = sum_i d_i v_i = B d                   k times the gradient in expectation
* ``projection``: g = B (B^T B)^{-1} B^T grad f             the orthogonal projection of grad f onto span(B):
                                                            exact when k = n, residual orthogonal to every v_i.

The k tangent passes are batched with ``torch.func.vmap`` over the tangent dimension; inside ``vmap`` the
primal inputs are unbatched, so the primal (the loss itself) is computed once and only the tangents carry the
extra batch dimension.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Dict, Mapping, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

__all__ = [
    "Params",
    "LossFn",
    "GradientEstimator",
    "Backprop",
    "ForwardGradient",
    "TANGENT_DISTRIBUTIONS",
    "AGGREGATIONS",
    "estimate_module_grads",
]

Params = Union[Tensor, Dict[str, Tensor]]
LossFn = Callable[[Params], Tensor]
#: ``sampler(shape, generator, dtype, device) -> Tensor`` with i.i.d. entries of mean 0 and variance 1.
TangentSampler = Callable[[Tuple[int, ...], torch.Generator, torch.dtype, torch.device], Tensor]


def _normal(shape, generator, dtype, device) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def _rademacher(shape, generator, dtype, device) -> Tensor:
    # +-1 with probability 1/2 each: mean 0, variance 1, and |v|^2 = n exactly (lower variance than normal).
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)


#: Tangent distributions by name. Each has E[v] = 0 and E[v v^T] = I, which is all unbiasedness needs.
TANGENT_DISTRIBUTIONS: Dict[str, TangentSampler] = {"normal": _normal, "rademacher": _rademacher}
AGGREGATIONS = ("mean", "sum", "projection")


def _to_dict(params: Params) -> Tuple[Dict[str, Tensor], bool]:
    """Return ``(dict_of_tensors, was_single_tensor)`` so both call styles share one code path."""
    if isinstance(params, Tensor):
        return {"": params}, True
    if isinstance(params, Mapping):
        return dict(params), False
    raise TypeError(f"params must be a Tensor or a dict[str, Tensor], got {type(params).__name__}.")


def _from_dict(d: Dict[str, Tensor], single: bool) -> Params:
    return d[""] if single else d


def _check_scalar(loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {shape}; reduce the loss (e.g. .mean()) "
            "before returning it."
        )


class GradientEstimator(ABC):
    """Common interface: ``loss, grads = est(loss_fn, params)``."""

    @abstractmethod
    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        """Return the loss at ``params`` (detached) and a gradient estimate shaped like ``params``."""

    def describe(self) -> Dict[str, object]:
        """Settings worth logging next to a run (estimator name and hyper-parameters)."""
        return {"estimator": type(self).__name__}


class Backprop(GradientEstimator):
    """The exact gradient by reverse-mode autodiff: the baseline every forward gradient is compared with."""

    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        p, single = _to_dict(params)
        with torch.enable_grad():
            leaves = {name: t.detach().requires_grad_(True) for name, t in p.items()}
            loss = loss_fn(_from_dict(leaves, single))
            _check_scalar(loss)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out = {
            name: (g if g is not None else torch.zeros_like(leaves[name]))
            for name, g in zip(leaves.keys(), grads)
        }
        return loss.detach(), _from_dict(out, single)


class ForwardGradient(GradientEstimator):
    """Forward-gradient estimator with ``num_tangents`` tangents per step.

    Args:
        num_tangents: k >= 1 tangents per step.
        aggregation: ``"mean"``, ``"sum"`` or ``"projection"`` (see the module docstring for the maths).
        distribution: a key of :data:`TANGENT_DISTRIBUTIONS` (``"normal"``, ``"rademacher"``, ...).
        seed: seed of the ``torch.Generator`` the estimator owns; the same seed gives the same tangents, and
            hence the same estimates, for the same sequence of calls.
    """

    def __init__(
        self,
        num_tangents: int = 1,
        aggregation: str = "mean",
        distribution: str = "normal",
        seed: int = 0,
    ) -> None:
        if not isinstance(num_tangents, int) or isinstance(num_tangents, bool) or num_tangents < 1:
            raise ValueError(
                f"num_tangents must be an integer >= 1 (the number of tangents per step), got {num_tangents!r}."
            )
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}."
            )
        if distribution not in TANGENT_DISTRIBUTIONS:
            raise ValueError(
                f"unknown tangent distribution {distribution!r}; allowed: {', '.join(TANGENT_DISTRIBUTIONS)}."
            )
        self.num_tangents = num_tangents
        self.aggregation = aggregation
        self.distribution = distribution
        self.seed = int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}

    # -- public API ------------------------------------------------------------------------------------
    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        p, single = _to_dict(params)
        p = {name: t.detach() for name, t in p.items()}
        if self.aggregation == "projection":
            n = sum(t.numel() for t in p.values())
            if self.num_tangents > n:
                raise ValueError(
                    f"projection needs num_tangents <= n (the number of parameters, {n}); got "
                    f"num_tangents={self.num_tangents}. With k = n the projection is already exact."
                )
        tangents = self.sample_tangents(p)
        loss, d = self.directional_derivatives(loss_fn, p, tangents, single)
        grads = self.aggregate(tangents, d)
        return loss, _from_dict(grads, single)

    def describe(self) -> Dict[str, object]:
        return {
            "estimator": type(self).__name__,
            "num_tangents": self.num_tangents,
            "aggregation": self.aggregation,
            "distribution": self.distribution,
            "seed": self.seed,
        }

    def generator(self, device: torch.device) -> torch.Generator:
        """The estimator's own generator on ``device`` (created on first use, seeded with ``seed``)."""
        device = torch.device(device)
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    # -- the three stages, separately overridable (e.g. to all-reduce ``d`` across workers) ---------------
    def sample_tangents(self, params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Draw ``k`` tangents per parameter tensor: a dict of ``(k, *shape)`` tensors."""
        sampler = TANGENT_DISTRIBUTIONS[self.distribution]
        k = self.num_tangents
        return {
            name: sampler((k, *t.shape), self.generator(t.device), t.dtype, t.device)
            for name, t in params.items()
        }

    def directional_derivatives(
        self,
        loss_fn: LossFn,
        params: Dict[str, Tensor],
        tangents: Dict[str, Tensor],
        single: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Return ``(f(params), d)`` with ``d[i] = <grad f, v_i>``, a tensor of shape ``(k,)``."""

        def f(p: Dict[str, Tensor]) -> Tensor:
            return loss_fn(_from_dict(p, single))

        if self.num_tangents == 1:
            loss, d = jvp(f, (params,), ({n: v[0] for n, v in tangents.items()},))
            _check_scalar(loss)
            return loss.detach(), d.detach().reshape(1)

        def one_tangent(v: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
            return jvp(f, (params,), (v,))

        # in_dims=0 batches only the tangents; out_dims=(None, 0): the primal output is unbatched, i.e. it was
        # computed once for all k tangents. randomness="same": dropout masks etc. are shared by every tangent,
        # as they must be for all k derivatives to be taken at the same point.
        loss, d = vmap(one_tangent, in_dims=(0,), out_dims=(None, 0), randomness="same")(tangents)
        _check_scalar(loss)
        return loss.detach(), d.detach().reshape(self.num_tangents)

    def aggregate(self, tangents: Dict[str, Tensor], d: Tensor) -> Dict[str, Tensor]:
        """Combine the k tangents and their directional derivatives into one estimate (module docstring)."""
        k = self.num_tangents
        if self.aggregation == "projection":
            coeff = self._projection_coefficients(tangents, d)
        elif self.aggregation == "mean":
            coeff = d / k
        else:  # sum
            coeff = d
        # g = B c, written per parameter tensor: g_p = sum_i c_i V_p[i]. tensordot keeps it one GEMV.
        return {
            name: torch.tensordot(coeff.to(v.dtype), v, dims=1) for name, v in tangents.items()
        }

    @staticmethod
    def _projection_coefficients(tangents: Dict[str, Tensor], d: Tensor) -> Tensor:
        """Solve ``(B^T B) c = d`` so that ``B c = B (B^T B)^{-1} B^T grad f`` (orthogonal projection).

        ``B^T B`` (k x k, the Gram matrix of the tangents over the whole concatenated parameter vector) is
        accumulated in float64 and solved by Cholesky; if it is numerically singular (tangents nearly
        linearly dependent) we fall back to the least-squares/pseudo-inverse solution, which still gives the
        orthogonal projection onto the span.
        """
        k = d.shape[0]
        gram = torch.zeros(k, k, dtype=torch.float64, device=d.device)
        for v in tangents.values():
            flat = v.reshape(k, -1)
            gram += (flat @ flat.T).to(torch.float64)
        rhs = d.to(torch.float64).unsqueeze(1)
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            coeff = torch.cholesky_solve(rhs, chol)
        else:
            coeff = torch.linalg.pinv(gram, hermitian=True) @ rhs
        return coeff.squeeze(1)


def estimate_module_grads(
    estimator: GradientEstimator,
    model: nn.Module,
    loss_of_output: Callable[[Tensor], Tensor],
    *inputs: Tensor,
) -> Tensor:
    """Estimate the gradient of ``loss_of_output(model(*inputs))`` and write it into ``p.grad``.

    This is the bridge to the ``torch.optim`` world: after it, any optimizer, scheduler or
    ``clip_grad_norm_`` works unchanged. Parameters with ``requires_grad=False`` are held fixed; buffers
    (e.g. batch-norm statistics) are passed through. Returns the (detached) loss.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_fn(p: Dict[str, Tensor]) -> Tensor:
        return loss_of_output(functional_call(model, (p, buffers), inputs))

    loss, grads = estimator(loss_fn, params)
    for name, param in model.named_parameters():
        if name in grads:
            param.grad = grads[name].to(param.dtype)
    return loss


def total_numel(params: Params) -> int:
    """Number of scalar parameters n (the dimension the tangents live in)."""
    p, _ = _to_dict(params)
    return int(sum(t.numel() for t in p.values()))


def cosine_similarity(a: Params, b: Params) -> float:
    """Cosine similarity of two parameter structures, taken over the whole concatenated vector."""
    da, _ = _to_dict(a)
    db, _ = _to_dict(b)
    dot = sum(float((da[n].double() * db[n].double()).sum()) for n in da)
    na = math.sqrt(sum(float(da[n].double().pow(2).sum()) for n in da))
    nb = math.sqrt(sum(float(db[n].double().pow(2).sum()) for n in db))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")
