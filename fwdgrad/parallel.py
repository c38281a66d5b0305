"""Data-parallel gradient estimation on ``torch.distributed`` (gloo on CPU, nccl on GPUs).

Every rank holds the full model and computes on its shard of each batch. The global loss is the shard-size
weighted mean of the local losses, ``L = sum_r w_r L_r`` with ``w_r = n_r / N``, and so is every linear
functional of it; in particular the directional derivatives are

    d_i = <grad L, v_i> = sum_r w_r <grad L_r, v_i>.

Forward gradients therefore need only the **k scalars** ``d`` all-reduced, provided every rank draws the same
tangents: the ranks' estimators share one seed, so their generators produce identical ``v_i`` and each rank
rebuilds the identical update ``g = aggregate(v, d)`` locally. Backprop (or any other estimator) needs the full
**n-dimensional** gradient all-reduced, as DistributedDataParallel does.

Usage (the training loop does this when ``distributed.world_size > 1`` or under ``torchrun``; its worker processes
are started and supervised by :mod:`fwdgrad.experiments.training.launch`)::

    est = DataParallelEstimator(ForwardGradient(seed=0))
    x, y = est.shard(x, y)               # this rank's rows; remembers w_r
    loss = estimate_module_grads(est, model, lambda out: cross_entropy(out, y), x)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from fwdgrad.errors import ConfigError, WorkerLostError
from fwdgrad.estimators import (
    DirectionalEstimator,
    GradientEstimator,
    LossFn,
    Params,
    as_param_dict,
    from_param_dict,
)
from fwdgrad.estimators.step_randomness import rng_states, set_rng_states

__all__ = ["CommStats", "DataParallelEstimator"]

log = logging.getLogger(__name__)


@dataclass
class CommStats:
    """Traffic of the last step: how many bytes this rank contributed to all-reduces."""

    bytes_allreduced: int = 0
    calls: int = 0


class DataParallelEstimator(GradientEstimator):
    """Wrap an estimator so that ranks computing on shards of one batch agree on the full-batch estimate.

    * :class:`~fwdgrad.estimators.ForwardGradient` (any :class:`~fwdgrad.estimators.DirectionalEstimator`):
      tangents are drawn identically on every rank (same seed) by the estimator's own draw, so rank-one
      factors and regenerated tangents stay as they are; the local loss and the k directional derivatives
      are all-reduced as one (k + 1)-vector of weighted values, and each rank then aggregates locally.
      Traffic: k + 1 floats per step.
    * any other estimator (e.g. :class:`Backprop`): the local gradient is computed and all-reduced with weight
      ``w_r``. Traffic: n + 1 floats per step.

    Call :meth:`shard` on each batch first: it returns this rank's rows and records ``w_r = n_r / N``.
    """

    def __init__(self, estimator: GradientEstimator, group: Optional[dist.ProcessGroup] = None) -> None:
        if hasattr(estimator, "estimate_module"):
            raise ConfigError(
                f"{type(estimator).__name__} estimates from the model's own layers (a module-level estimator) "
                "and has no data-parallel form yet; use distributed.world_size=1 with it."
            )
        self.estimator = estimator
        self.group = group
        self.weight = 1.0
        self.rows: Optional[int] = None  #: rows of this rank's last shard (None: no shard taken yet)
        self.stats = CommStats()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def describe(self) -> Dict[str, object]:
        return {**self.estimator.describe(), "world_size": self.world_size}

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.estimator.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.estimator.load_state_dict(state)

    def shard(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """This rank's contiguous slice (along dim 0) of each tensor; sets the weight ``n_r / N``.

        A batch of fewer rows than ranks leaves some ranks an empty shard (weight 0): those contribute exactly
        nothing to the step (see :meth:`__call__`).
        """
        n = tensors[0].shape[0]
        parts = [torch.tensor_split(t, self.world_size, dim=0)[self.rank] for t in tensors]
        self.rows = parts[0].shape[0]
        self.weight = self.rows / n if n else 0.0
        return tuple(parts)

    def _all_reduce(self, t: Tensor, op: Any = None, count: bool = True) -> Tensor:
        if count:
            self.stats.bytes_allreduced += t.numel() * t.element_size()
            self.stats.calls += 1
        if self.world_size == 1:
            return t
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        except Exception as exc:  # gloo raises RuntimeError (or DistBackendError) on a lost peer / timeout
            first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""  # gloo appends advice and emoji
            raise WorkerLostError(
                f"rank {self.rank}: an all-reduce failed ({type(exc).__name__}: {first}). Another worker probably "
                "died or stopped answering; this worker stops too. Check the other workers' logs for the original "
                "error."
            ) from exc
        return t

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (e.g. counts for a whole-batch metric); not counted in :attr:`stats`."""
        return self._all_reduce(t.clone(), count=False)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank must call this at the same point)."""
        return bool(self._all_reduce(torch.tensor([int(flag)], dtype=torch.int32, device=self._device()),
                                     op=dist.ReduceOp.MAX, count=False).item())

    def _device(self) -> torch.device:
        # nccl reduces only CUDA tensors; gloo takes CPU tensors
        if dist.is_initialized() and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        self.stats = CommStats()
        devices = [t.device for t in as_param_dict(params)[0].values()]
        before = rng_states(devices)
        result = self._compute(loss_fn, params)
        self._share_randomness(before, devices)
        return result

    def _share_randomness(self, before: List[Tensor], devices: Sequence[torch.device]) -> None:
        """One random stream for all the replicas: when any rank drew from torch's global generators during the
        step (dropout in the loss), every rank continues from rank 0's state. Shards of different sizes (an
        empty one, a short last batch) draw different amounts, and the ranks' streams would otherwise drift
        apart for the rest of the run. A flag (not counted in :attr:`stats`) when nothing was drawn."""
        if self.world_size == 1:
            return
        drew = any(not torch.equal(a, b) for a, b in zip(before, rng_states(devices)))
        if not self.any_rank(drew):
            return
        states = []
        for state in rng_states(devices):
            on_device = state.to(self._device())  # nccl broadcasts device tensors only
            dist.broadcast(on_device, src=0, group=self.group)
            states.append(on_device.cpu())
        set_rng_states(states, devices)

    def _compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        # An empty shard contributes exactly nothing: its loss, a mean over no rows, would be 0/0 = nan, and
        # nan * 0 is still nan. Every rank still joins the all-reduce (and draws the step's tangents, which
        # keeps the ranks' generators in step).
        empty = self.rows == 0
        if isinstance(self.estimator, DirectionalEstimator):
            return self._directional(loss_fn, params, empty)
        p, single = as_param_dict(params)
        if empty:
            g = {name: torch.zeros_like(t) for name, t in p.items()}
            loss = torch.zeros((), dtype=next(iter(p.values())).dtype, device=next(iter(p.values())).device)
        else:
            loss, grads = self.estimator(loss_fn, params)
            g = as_param_dict(grads)[0]
        names = list(g)
        flat = torch.cat([loss.reshape(1).to(g[names[0]].dtype)] + [g[n].reshape(-1) for n in names]) * self.weight
        flat = self._all_reduce(flat)
        out, offset = {}, 1
        for n in names:
            out[n] = flat[offset: offset + g[n].numel()].view_as(g[n])
            offset += g[n].numel()
        return flat[0].to(loss.dtype), from_param_dict(out, single)

    def _directional(self, loss_fn: LossFn, params: Params, empty: bool) -> Tuple[Tensor, Params]:
        """k + 1 scalars all-reduced: the weighted local loss and directional derivatives."""
        est = self.estimator
        p, single = as_param_dict(params)
        p = {name: t.detach() for name, t in p.items()}
        # The estimator's own draw, as in its __call__ (rank-one factors, regenerated tangents, reused
        # buffers): identical on every rank, since the ranks share the seed and the call sequence.
        draw = est.draw(p)
        if empty:
            k = _num_tangents(next(iter(draw.tangents.values())))
            packed = torch.zeros(k + 1, dtype=torch.float64, device=next(iter(p.values())).device)
            loss_dtype = d_dtype = next(iter(p.values())).dtype
        else:
            loss, d = est.directional_derivatives(loss_fn, p, draw.tangents, single)
            packed = torch.cat([loss.reshape(1), d]).to(torch.float64) * self.weight
            loss_dtype, d_dtype = loss.dtype, d.dtype
        packed = self._all_reduce(packed)
        loss, d = packed[0].to(loss_dtype), packed[1:].to(d_dtype)
        return loss, from_param_dict(est.estimate(draw, d), single)


def _num_tangents(tangent: Any) -> int:
    """k of one parameter's tangent: a ``(k, *shape)`` tensor, or a RankOne / Regenerated with ``.k``."""
    return int(tangent.shape[0]) if isinstance(tangent, Tensor) else int(tangent.k)
