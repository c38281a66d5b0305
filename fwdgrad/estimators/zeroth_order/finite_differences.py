"""The zeroth-order estimator (SPSA; MeZO, Malladi et al. 2023): directional derivatives by finite differences.

For the tangents ``v_1..v_k`` of the forward gradient (same distributions, same seeded-chunk layout) the
directional derivative ``d_i = <grad f, v_i>`` is estimated from loss values alone:

* central (default): ``d_i = (f(theta + eps v_i) - f(theta - eps v_i)) / (2 eps)``. With ``g(t) = f(theta + t v)``,
  ``d_i - g'(0) = (eps^2 / 6) g'''(xi)`` for some ``|xi| <= eps`` (truncation, O(eps^2)); rounding each loss to
  precision u adds at most about ``u |f| / eps``. Their sum is smallest at ``eps* = (3 u |f| / |g'''|)^(1/3)``
  (docs/zeroth_order.md measures both terms on the MNIST MLP and explains the default eps = 1e-3).
* forward (``difference="forward"``): ``d_i = (f(theta + eps v_i) - f(theta)) / eps``, truncation
  ``(eps / 2) g''(xi)``, O(eps); one pass per tangent instead of two.

The estimate is then the forward gradient's ``g = B c(d)`` with the same aggregations, so ``E[g] = grad f`` up to
the finite-difference bias. No forward-mode rule is needed: any loss PyTorch can evaluate works, including ops
without forward-mode AD. A step costs ``2k + 1`` no-grad forward passes (central; ``2k`` with
``exact_loss=False``) or ``k + 1`` (forward), and memory about that of one no-grad pass:

* tangents are never stored, only their step's seed (:func:`~.seeded_tangents.draw_chunked`); each pass
  regenerates a layer's tangent chunk by chunk while the layer runs (:mod:`.perturbation`), and the estimate
  regenerates them once more (k = 1: in place into the output);
* the parameters are never written (perturbed at use time), so they are bit-identical after a step, also when
  the loss raises mid-pass;
* all passes of a step replay the same global random numbers (dropout), so they evaluate one function.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor

from fwdgrad.engine import Tangent
from fwdgrad.errors import ConfigError
from fwdgrad.estimators.aggregation import AGGREGATIONS, AggregationInput, combine_tangent
from fwdgrad.estimators.base import (
    GradientEstimator,
    LossFn,
    Params,
    check_scalar_loss,
    from_param_dict,
    run_stages,
)
from fwdgrad.estimators.step_randomness import SameRandomness, randomness_untouched
from fwdgrad.estimators.tangents.distributions import (
    TANGENT_DISTRIBUTIONS,
    ChunkedDistribution,
    DrawContext,
    TangentDraw,
)
from fwdgrad.estimators.tangents.rng import ChunkedRNG, SeededGenerators
from fwdgrad.estimators.tangents.seeded import (
    ChunkedTangent,
    chunk_reads_exact,
    draw_chunked,
    entries_per_random,
)
from fwdgrad.estimators.zeroth_order.perturbed_loss import Perturbation, PerturbedPass
from fwdgrad.estimators.zeroth_order.unseen_derivatives import unseen_derivatives

__all__ = ["ZerothOrder", "DIFFERENCES", "CHUNK_ENTRIES", "check_epsilon"]

log = logging.getLogger(__name__)

DIFFERENCES = ("central", "forward")
#: Tangent entries per seeded chunk by default: 2^16 (256 KiB in float32), so that what a layer regenerates at a
#: time stays a small fraction of a no-grad pass's activations (8 MiB per 2048 x 1024 float32 activation).
CHUNK_ENTRIES = 1 << 16
DictLoss = Callable[[Dict[str, Tensor]], Tensor]


def _check_settings(num_tangents: object, epsilon: object, difference: object, chunk_entries: object) -> None:
    if not isinstance(num_tangents, int) or isinstance(num_tangents, bool) or num_tangents < 1:
        raise ConfigError(f"num_tangents must be an integer >= 1 (tangents per step), got {num_tangents!r}.")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < math.inf:
        raise ConfigError(f"epsilon must be a finite number > 0 (the finite-difference step), got {epsilon!r}; "
                          "e.g. epsilon=1e-3.")
    if difference not in DIFFERENCES:
        raise ConfigError(f"difference must be one of {', '.join(DIFFERENCES)}, got {difference!r}.")
    if not isinstance(chunk_entries, int) or isinstance(chunk_entries, bool) or chunk_entries < 1:
        raise ConfigError(f"chunk_entries must be an integer >= 1, got {chunk_entries!r}.")


class ZerothOrder(SeededGenerators, GradientEstimator):
    """Zeroth-order gradient estimate with ``num_tangents`` tangents per step (module docstring).

    Args:
        num_tangents: k >= 1 tangents per step.
        epsilon: the finite-difference step eps (> 0); the perturbation is ``eps v`` with the tangent as drawn.
        distribution: a key of :data:`~fwdgrad.estimators.tangents.distributions.TANGENT_DISTRIBUTIONS`. Dense chunked ones
            (``normal``, ``rademacher``) are regenerated, never stored; ``rank1`` keeps its factors (m + n numbers
            per matrix); a plain sampler's tangents are kept as drawn.
        aggregation: a key of :data:`~fwdgrad.estimators.aggregation.AGGREGATIONS`.
        seed: seed of the generator the estimator owns (one draw per step gives the step's chunk seeds).
        difference: ``"central"`` or ``"forward"`` (one-sided).
        exact_loss: central differences never evaluate ``f(theta)``; True (default) spends one more no-grad pass
            on it, so the loss returned is ``f(theta)``. False returns the mean of ``(f(theta + eps v_i) +
            f(theta - eps v_i)) / 2``, which is ``f(theta) + (eps^2 / 2) <v, H v> + O(eps^4)``, as MeZO reports.
        chunk_entries: tangent entries per seeded chunk (what a layer regenerates at a time). With
            ``fwdgrad.estimators.tangents.rng.CHUNK`` (times the entries per random number, 32 for float32
            rademacher) the tangents equal a ForwardGradient's with the same seed.
        check_derivatives: before the first step, look for derivatives the loss defines otherwise than its
            values do (custom autograd Functions, detached or no-grad values of the parameters:
            :mod:`~fwdgrad.estimators.zeroth_order.unseen_derivatives`), which finite differences cannot see,
            and refuse them by name (default). False estimates the values' derivative anyway, with a warning.

    Before the first step it also checks the parameters' dtype (float16 and bfloat16 round ``theta + eps v``,
    and bfloat16 back to ``theta``: refused) and that ``eps`` suits it (above the dtype's resolution, far
    below its overflow).
    """

    def __init__(self, num_tangents: int = 1, epsilon: float = 1e-3, distribution: str = "normal",
                 aggregation: str = "mean", seed: int = 0, difference: str = "central", exact_loss: bool = True,
                 chunk_entries: int = CHUNK_ENTRIES, check_derivatives: bool = True) -> None:
        _check_settings(num_tangents, epsilon, difference, chunk_entries)
        self.check_derivatives = bool(check_derivatives)
        self._preconditions_checked = False
        self.num_tangents, self.epsilon, self.difference = num_tangents, float(epsilon), difference
        self.exact_loss, self.chunk_entries, self.seed = bool(exact_loss), chunk_entries, int(seed)
        self.aggregation, self.rule = aggregation, AGGREGATIONS.lookup(aggregation)
        self.distribution, self.tangent_distribution = distribution, TANGENT_DISTRIBUTIONS.lookup(distribution)
        dist = self.tangent_distribution
        ratio = entries_per_random(dist, torch.float32) if isinstance(dist, ChunkedDistribution) else 1
        self.rng = ChunkedRNG(max(1, chunk_entries // ratio))
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._chunkwise: Dict[Tuple[torch.dtype, torch.device], bool] = {}  # chunk reads checked exact
        self._checked: Set[str] = set()  # parameters known to be seen by the perturbation, or unused
        self._logged_ops: Set[str] = set()

    def compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        return run_stages(self, loss_fn, params)

    def describe(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "estimator": type(self).__name__, "num_tangents": self.num_tangents, "epsilon": self.epsilon,
            "difference": self.difference, "aggregation": self.aggregation, "distribution": self.distribution,
            "seed": self.seed,
        }
        if not self.exact_loss:
            out["exact_loss"] = False
        if self.chunk_entries != CHUNK_ENTRIES:  # memory/speed only, never the estimates' law
            out["chunk_entries"] = self.chunk_entries
        if not self.check_derivatives:
            out["check_derivatives"] = False
        return out

    @property
    def first_evaluation_at_params(self) -> bool:  # type: ignore[override]
        """Central differences without ``exact_loss`` evaluate only at ``theta +- eps v``."""
        return self.exact_loss or self.difference != "central"

    def state_dict(self) -> Dict[str, object]:
        """The generators' states: the next tangents (all a resumed run needs to continue exactly)."""
        return {"generators": self.generator_states()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.load_generator_states(state["generators"])  # type: ignore[arg-type]

    # -- the three stages of a DirectionalEstimator (the data-parallel wrapper all-reduces (loss, d) between) ----
    def draw(self, params: Dict[str, Tensor]) -> TangentDraw:
        """This step's tangents: seeds only (:class:`ChunkedTangent`) for dense chunked distributions; otherwise
        the distribution's own draw (rank-one factors, a sampler's tensors), regenerated blocks where it can."""
        if self._chunk_reads_ok(params):
            return draw_chunked(self.tangent_distribution, params, self.num_tangents, self.generator, self.rng)
        ctx = DrawContext(self.generator, self.rng, kept_blocks=lambda sizes: 0)
        return self.tangent_distribution.draw(params, self.num_tangents, ctx)

    def directional_derivatives(
        self, loss_fn: LossFn, params: Dict[str, Tensor], tangents: Mapping[str, Tangent], single: bool = False
    ) -> Tuple[Tensor, Tensor]:
        """``(f(params), d)`` with ``d[i]`` the finite-difference estimate of ``<grad f, v_i>`` (shape ``(k,)``),
        from no-grad passes at ``params +- eps v_i`` (module docstring). Tangents of any kind are accepted."""

        def f(p: Dict[str, Tensor]) -> Tensor:
            return loss_fn(from_param_dict(p, single))

        central, eps = self.difference == "central", self.epsilon
        if not self._preconditions_checked:
            self._check_preconditions(f, params)
        with torch.no_grad():
            replay = SameRandomness(t.device for t in params.values())
            f0 = self._evaluate(f, params, replay) if (self.exact_loss or not central) else None
            plus, minus = [], []
            for i in range(self.num_tangents):
                plus.append(self._evaluate(f, params, replay, tangents, i, eps))
                if central:
                    minus.append(self._evaluate(f, params, replay, tangents, i, -eps))
            fp = torch.stack(plus).double()
            if central:
                fm = torch.stack(minus).double()
                d = (fp - fm) / (2 * eps)  # fp - fm is exact in float64 for float32 losses
                loss = f0 if f0 is not None else ((fp + fm) / 2).mean()
            else:
                assert f0 is not None
                d, loss = (fp - f0.double()) / eps, f0
        return loss.to(plus[0].dtype), d.to(plus[0].dtype)

    def estimate(self, draw: TangentDraw, d: Tensor) -> Dict[str, Tensor]:
        """``g = B c(d)``, regenerating seeded tangents chunk by chunk; never modifies a kept tangent."""
        c = self.rule(AggregationInput(draw.tangents, d, draw.n))
        return {name: (t.combine(c) if isinstance(t, ChunkedTangent) else combine_tangent(t, c))
                for name, t in draw.tangents.items()}

    # -- helpers ----------------------------------------------------------------------------------------------
    def _check_preconditions(self, f: DictLoss, params: Dict[str, Tensor]) -> None:
        """Once, before the first step: the dtype and eps, then what finite differences cannot see."""
        for dtype in sorted({t.dtype for t in params.values()}, key=str):
            check_epsilon(self.epsilon, dtype)
        devices = [t.device for t in params.values()]
        with randomness_untouched(devices):  # not part of the step
            found = unseen_derivatives(f, params, SameRandomness(devices).restore)
        if found and not self.check_derivatives:
            log.warning("zeroth order estimates the derivative of the loss's values, not the one it defines: %s "
                        "(check_derivatives=false)", "; ".join(found))
        elif found:
            raise ConfigError(
                "zeroth order estimates the derivative of the loss's values, but this loss defines its "
                f"derivative otherwise: {'; '.join(found)}. Backprop follows the defined derivative, so the "
                "two would disagree without a word (gradient reversal: the opposite sign; straight-through: "
                "0 instead of the identity; p * p.detach(): 2p instead of p). Use gradient=backprop or "
                "gradient=forward (which uses a Function's jvp), or pass check_derivatives=false to estimate "
                "the values' derivative on purpose.")
        self._preconditions_checked = True

    def _chunk_reads_ok(self, params: Mapping[str, Tensor]) -> bool:
        dist = self.tangent_distribution
        if not (isinstance(dist, ChunkedDistribution) and dist.dense_blocks and dist.supports(params)):
            return False
        for key in {(t.dtype, t.device) for t in params.values()}:
            if key not in self._chunkwise:
                self._chunkwise[key] = chunk_reads_exact(dist, *key)
                if not self._chunkwise[key]:
                    log.warning("zeroth order: distribution %r cannot be regenerated chunk by chunk for %s on %s; "
                                "its tangents are regenerated whole, one parameter at a time.", self.distribution,
                                *key)
            if not self._chunkwise[key]:
                return False
        return True

    def _evaluate(self, f: DictLoss, params: Dict[str, Tensor], replay: SameRandomness,
                  tangents: Optional[Mapping[str, Tangent]] = None, i: int = 0, eps: float = 0.0) -> Tensor:
        """One no-grad pass: ``f(params)``, or ``f(params + eps v_i)`` under :class:`PerturbedPass`."""
        replay.restore()
        if tangents is None:
            loss = f(params)
        else:
            mode = PerturbedPass({n: Perturbation(p, tangents[n], i, eps) for n, p in params.items()})
            with mode:
                loss = f(params)
            self._after_pass(mode, f, params, replay, loss)
        check_scalar_loss(loss)
        return loss.detach()

    def _after_pass(self, mode: PerturbedPass, f: DictLoss, params: Dict[str, Tensor], replay: SameRandomness,
                    loss: Tensor) -> None:
        """Log operations that materialised a whole parameter (once each), and check parameters no operation
        read (once each): see :func:`check_unseen`."""
        for op in sorted(mode.materialised - self._logged_ops):
            log.info("zeroth order: %s reads a whole parameter, so it gets theta + eps v materialised (one "
                     "parameter-sized temporary per call; F.linear has a row-block path).", op)
        self._logged_ops |= mode.materialised
        self._checked |= mode.seen
        unseen = [n for n in params if n not in self._checked]
        if unseen:
            check_unseen(f, params, unseen, replay, loss)
            self._checked |= set(unseen)


def check_epsilon(epsilon: float, dtype: torch.dtype) -> None:
    """Refuse a dtype or an ``epsilon`` with which ``theta + eps v`` cannot be evaluated meaningfully.

    float16 and bfloat16 carry 11 and 8 significant bits: ``theta + eps v`` is rounded (bfloat16 at eps = 1e-3
    rounds it back to theta, an estimate of exactly 0). Below the dtype's resolution (``finfo.eps``) the same
    happens for |theta| >= 1; above the square root of its largest number the perturbed parameters, and any
    product of two of them in the loss, overflow (``epsilon=1e30`` in float32: every estimate NaN).
    """
    if dtype in (torch.float16, torch.bfloat16):
        raise ConfigError(
            f"zeroth order needs float32 or float64 parameters: in {str(dtype).replace('torch.', '')} theta + eps v "
            "is rounded (in bfloat16 back to theta at eps = 1e-3), so the finite differences measure rounding, "
            "not the loss. Convert the model first (model.float()), or use gradient=forward.")
    info = torch.finfo(dtype)
    low, high = info.eps, math.sqrt(info.max) / 10
    if not low <= epsilon <= high:
        raise ConfigError(
            f"epsilon={epsilon!r} does not suit {str(dtype).replace('torch.', '')} parameters: it must lie between "
            f"{low:.1e} (below, theta + eps v rounds to theta) and {high:.1e} (above, the perturbed parameters "
            "and the loss overflow to inf/NaN). A step of about 1e-3 is usual (docs/zeroth_order.md).")


def check_unseen(f: DictLoss, params: Dict[str, Tensor], names: List[str], replay: SameRandomness,
                 loss: Tensor) -> None:
    """Raise if a parameter no intercepted operation read still reaches the loss.

    A parameter the perturbation never saw is either unused (its gradient is 0, as the estimate then says) or
    read by something that bypasses torch's Python dispatch (a C++ extension, another thread), which would see
    the unperturbed value: a silently wrong derivative. A pass with such a parameter set to NaN tells them apart
    (a finite loss: unused). Skipped when the loss itself is not finite.
    """
    if not bool(torch.isfinite(loss)):
        return
    hidden = []
    for name in names:  # one probe pass per unseen parameter, once per estimator
        replay.restore()
        if not bool(torch.isfinite(f({**params, name: torch.full_like(params[name], math.nan)}))):
            hidden.append(name)
    if hidden:
        raise ConfigError(
            f"zeroth order: parameter(s) {', '.join(repr(n) for n in hidden)} reach the loss through an operation "
            "the perturbation cannot see (one that bypasses torch's Python dispatch, such as a C++ extension or "
            "work on another thread), so the finite differences would miss them. Use gradient=forward or "
            "gradient=backprop for this model."
        )
