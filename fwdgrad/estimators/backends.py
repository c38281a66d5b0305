"""How the directional derivatives ``d = B^T grad f`` are computed: the fast engine or ``torch.func``.

* ``"fast"``: :func:`fwdgrad.engine.forward_tangents`, one forward pass carrying all k tangents (in groups
  under the memory budget), with batched rules for linear/conv layers and rank-one rules.
* ``"func"``: ``torch.func.jvp`` (``vmap`` over it for k > 1; the primal is computed once and only the
  tangents carry the extra batch dimension). The generic reference.
* ``"auto"`` (default): ``fast``, falling back to ``func`` the first time the loss uses an op the fast engine
  has no rule for. The fallback is for good (the same loss would fail the same way every step) and visible:
  one warning in the log, :attr:`BackendDispatch.fallback_reason`, and ``describe()`` reporting
  ``"func (fallback: <reason>)"``.
* ``"simulated"``: frog's simulated forward gradient: ``grad f`` by one backward pass, then ``d = B^T grad f``
  (:func:`simulated_derivatives`). Not backprop-free, so not a training method to report as one; it is for large
  studies of the estimators' quality (the same estimates as a forward-mode pass, at the price of backprop plus
  k dot products, whatever the model's ops).

All give the same numbers up to rounding (tests check this).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor
from torch.func import jvp, vmap

from fwdgrad.engine import RankOne, Tangent, Unsupported, forward_tangents, tangent_slice
from fwdgrad.errors import ConfigError
from fwdgrad.estimators.base import Backprop, check_scalar_loss
from fwdgrad.estimators.memory_policy import TangentMemoryPolicy
from fwdgrad.estimators.step_randomness import SameRandomness
from fwdgrad.estimators.tangents.distributions import dense_tangent

__all__ = ["BACKENDS", "BackendDispatch", "PassStateDict", "fast_derivatives", "func_derivatives",
           "simulated_derivatives"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "func", "simulated")
DictLoss = Callable[[Dict[str, Tensor]], Tensor]


def fast_derivatives(
    f: DictLoss, params: Dict[str, Tensor], tangents: Mapping[str, Tangent], k: int, policy: TangentMemoryPolicy,
    vector: bool = False, replay: Optional[SameRandomness] = None,
) -> Tuple[Tensor, Tensor]:
    """The fast engine over all k tangents, in groups sized by ``policy``; records the pass size in it.
    ``vector``: ``f`` may return any shape S and ``d`` is its tangent, ``(k, *S)``. Every group after the first
    repeats the primal pass with the step's random state (``replay``, captured here when not given), so that
    dropout and other randomness inside ``f`` are the same for all k tangents.

    Raises :class:`~fwdgrad.errors.Unsupported` if the loss uses an op without a rule.
    """
    kw = {"vector": True} if vector else {}  # (the scalar call keeps its historical signature)
    if k == 1:
        stats: Dict[str, float] = {}
        out = forward_tangents(f, params, tangents, 1, stats, **kw)
        policy.record(stats["max_bytes_per_tangent"])
        return out
    ds, i, loss = [], 0, None
    per, largest = policy.bytes_per_tangent, 0.0
    replay = replay or SameRandomness(t.device for t in params.values())
    while i < k:
        if i:
            replay.restore()
        group = policy.group_size(k - i, per)
        part = tangents if group == k else {n: tangent_slice(t, i, i + group) for n, t in tangents.items()}
        stats = {}
        loss, d = forward_tangents(f, params, part, group, stats, **kw)
        if loss.dim() != 0 and not vector:
            return loss, d  # the caller reports the non-scalar loss
        per = stats["max_bytes_per_tangent"]  # sizes the next group of this call
        largest = max(largest, per)
        ds.append(d)
        i += group
    policy.record(largest)
    assert loss is not None
    return loss, torch.cat(ds)


def func_derivatives(
    f: DictLoss, params: Dict[str, Tensor], tangents: Mapping[str, Tangent], k: int, vector: bool = False
) -> Tuple[Tensor, Tensor]:
    """``torch.func.jvp`` (``vmap``-ed over the k tangents); the tangents are materialised. ``vector``: as
    :func:`fast_derivatives`.

    The loss sees copies of ``params``, and a write into them is an error: through jvp's wrappers an in-place op
    on an input also scales the *tangent* tensor in place, so the derivatives would be wrong, and without the
    copies the caller's tensors would be changed too. (The fast engine refuses in-place ops on tangent-carrying
    tensors before they run, and falls back to this path.)
    """
    dense = {name: dense_tangent(t) for name, t in tangents.items()}
    params = {name: t.clone() for name, t in params.items()}
    versions = [t._version for t in params.values()]
    try:
        loss, d = _func_jvp(f, params, dense, k, vector)
    except NotImplementedError as err:  # an op torch's own forward-mode AD has no formula for
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"the loss uses an op that forward-mode AD cannot differentiate: neither fwdgrad's engine nor "
            f"torch.func has a rule for it (torch says: {first}). This happens with fused kernels such as "
            "nn.LSTM's and nn.MultiheadAttention's CPU attention. Use an estimator that needs no forward-mode "
            "derivative (gradient=backprop, or gradient=zeroth_order: finite differences), or build the model "
            "from ops with rules (fwdgrad.engine.supported_functions())."
        ) from None
    if any(t._version != v for t, v in zip(params.values(), versions)):
        raise ConfigError(
            "loss_fn modifies the parameters it was given in place (e.g. p.mul_(2) or p[0] = 0): forward-mode "
            "differentiation through an in-place write into its inputs gives wrong derivatives, so no estimate is "
            "returned. The caller's tensors are unchanged. Use out-of-place operations (p * 2) on the parameters."
        )
    return loss, d


def _func_jvp(f: DictLoss, params: Dict[str, Tensor], dense: Dict[str, Tensor], k: int,
              vector: bool) -> Tuple[Tensor, Tensor]:
    if k == 1:
        loss, d = jvp(f, (params,), ({n: v[0] for n, v in dense.items()},))
        if not vector:
            check_scalar_loss(loss)
        return loss.detach(), d.detach().reshape(1, *loss.shape)

    def one_tangent(v: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        return jvp(f, (params,), (v,))

    # in_dims=0 batches only the tangents; out_dims=(None, 0): the primal output is unbatched, i.e. it was
    # computed once for all k tangents. randomness="same": dropout masks etc. are shared by every tangent,
    # as they must be for all k derivatives to be taken at the same point.
    loss, d = vmap(one_tangent, in_dims=(0,), out_dims=(None, 0), randomness="same")(dense)
    if not vector:
        check_scalar_loss(loss)
    return loss.detach(), d.detach().reshape(k, *loss.shape)


def simulated_derivatives(
    f: DictLoss, params: Dict[str, Tensor], tangents: Mapping[str, Tangent], k: int
) -> Tuple[Tensor, Tensor]:
    """``d = B^T grad f`` with ``grad f`` from one backward pass (frog's "simulated" forward gradient).

    ``d_i = sum_p <G_p, V_p[i]>`` over the parameter tensors, accumulated in float64; a rank-one tangent needs
    only its factors, ``<G, u v^T> = u^T G v``. The loss and ``d`` are those of a forward-mode pass up to rounding.
    """
    loss, grads = Backprop()(f, params)
    d = torch.zeros(k, dtype=torch.float64, device=loss.device)
    for name, t in tangents.items():
        g = grads[name].to(torch.float64)
        if isinstance(t, RankOne):
            u, v = t.u.to(torch.float64), t.v.to(torch.float64)
            d += ((u @ g.reshape(u.shape[1], -1)) * v).sum(1)  # u_i^T G v_i for every i
        else:
            d += dense_tangent(t).reshape(k, -1).to(torch.float64) @ g.reshape(-1)
    return loss, d.to(loss.dtype)


class PassStateDict:
    """Mixin: ``state_dict()`` / ``load_state_dict()`` for an estimator with its own generators
    (:class:`~fwdgrad.estimators.tangents.rng.SeededGenerators`), a memory policy ``self.memory`` and a ``self.dispatch``:
    what its next estimates depend on: the generators' states (the next tangents), the policy's measurement (how
    the next pass is grouped, which changes the rounding) and a fallback to torch.func."""

    def state_dict(self) -> Dict[str, object]:
        return {"generators": self.generator_states(),  # type: ignore[attr-defined]
                "bytes_per_tangent": self.memory.bytes_per_tangent,  # type: ignore[attr-defined]
                "fallback_reason": self.dispatch.fallback_reason}  # type: ignore[attr-defined]

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.load_generator_states(state["generators"])  # type: ignore[attr-defined]
        self.memory.bytes_per_tangent = state.get("bytes_per_tangent")  # type: ignore[attr-defined]
        self.dispatch.fallback_reason = state.get("fallback_reason")  # type: ignore[attr-defined]


class BackendDispatch:
    """The backend choice, and the fallback of ``"auto"`` to ``torch.func`` once it has happened."""

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}.")
        self.backend = backend
        #: Why ``"auto"`` fell back to ``torch.func`` (the engine's message), or None while it has not.
        self.fallback_reason: Optional[str] = None

    @property
    def uses_fast(self) -> bool:
        """Whether the next call runs the fast engine."""
        return self.backend in ("auto", "fast") and self.fallback_reason is None

    def describe(self) -> Dict[str, str]:
        """``{"backend": ...}`` for an estimator's ``describe()``: ``"func (fallback: <reason>)"`` after a
        fallback, the backend when not the default; empty otherwise (nothing worth logging)."""
        if self.fallback_reason is not None:
            return {"backend": f"func (fallback: {self.fallback_reason})"}
        return {} if self.backend == "auto" else {"backend": self.backend}

    def __call__(
        self, f: DictLoss, params: Dict[str, Tensor], tangents: Mapping[str, Tangent], k: int,
        policy: TangentMemoryPolicy, vector: bool = False, replay: Optional[SameRandomness] = None,
    ) -> Tuple[Tensor, Tensor]:
        """``(f(params), d)`` with ``d[i] = <grad f, v_i>`` (shape ``(k,)``), both detached. ``vector``: ``f``
        may return any shape S, and ``d[i]`` is the output's tangent along ``v_i`` (``d`` is ``(k, *S)``).

        Every pass ``f`` gets (tangent groups, a fallback after a partial fast pass) starts from the random
        state the call began with (``replay``, captured here when not given): one random stream per step."""
        replay = replay or SameRandomness(t.device for t in params.values())
        if self.backend == "simulated":
            if vector:
                raise ConfigError("the simulated backend computes d = B^T grad f of a scalar loss; per-example "
                                  "directional derivatives (activity perturbation) need backend='fast' or 'func'.")
            return simulated_derivatives(f, params, tangents, k)
        if self.uses_fast:
            try:
                loss, d = fast_derivatives(f, params, tangents, k, policy, vector, replay)
            except Unsupported as e:
                self._fall_back(e)
                replay.restore()  # the abandoned fast pass may have drawn numbers already
            else:
                if not vector:
                    check_scalar_loss(loss)
                return loss, d
        return func_derivatives(f, params, tangents, k, vector)

    def _fall_back(self, error: Unsupported) -> None:
        if self.backend == "fast":
            raise ConfigError(
                f"backend='fast' cannot differentiate this loss: {error}. Use backend='auto' (falls back "
                "to torch.func) or backend='func'."
            ) from None
        self.fallback_reason = str(error)
        log.warning("forward gradient: fast path unavailable (%s); using torch.func.jvp from now on "
                    "(describe() reports backend 'func (fallback: ...)').", error)
