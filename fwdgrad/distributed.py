"""Data-parallel gradient estimation on ``torch.distributed`` (gloo on CPU, nccl on GPUs).

Every rank holds the full model and computes on its shard of each batch. The global loss is the shard-size
weighted mean of the local losses, ``L = sum_r w_r L_r`` with ``w_r = n_r / N``, and so is every linear
functional of it; in particular the directional derivatives are

    d_i = <grad L, v_i> = sum_r w_r <grad L_r, v_i>.

Forward gradients therefore need only the **k scalars** ``d`` all-reduced, provided every rank draws the same
tangents: the ranks' estimators share one seed, so their generators produce identical ``v_i`` and each rank
rebuilds the identical update ``g = aggregate(v, d)`` locally. Backprop (or any other estimator) needs the full
**n-dimensional** gradient all-reduced, as DistributedDataParallel does.

Usage (the training loop does this when ``distributed.world_size > 1`` or under ``torchrun``)::

    est = DataParallelEstimator(ForwardGradient(seed=0))
    x, y = est.shard(x, y)               # this rank's rows; remembers w_r
    loss = estimate_module_grads(est, model, lambda out: cross_entropy(out, y), x)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

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

__all__ = ["DataParallelEstimator", "init_from_env", "find_free_port",
           "launch_workers", "env_world_size"]

log = logging.getLogger(__name__)


def env_world_size() -> int:
    """World size announced by a launcher such as ``torchrun`` (1 when not launched that way)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def find_free_port() -> int:
    """A free TCP port on localhost for the rendezvous of locally spawned workers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(backend: str = "auto", timeout_s: float = 60.0) -> None:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``.

    ``timeout_s`` bounds every collective: a worker that dies makes the others fail with
    :class:`WorkerLostError` after at most that long instead of hanging forever.
    """
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "distributed.backend=nccl needs CUDA GPUs, and none is visible; use distributed.backend=gloo "
            "(or auto) to run on CPU."
        )
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=float(timeout_s)))


def launch_workers(fn: Callable[..., None], world_size: int, args: Sequence = (), timeout_s: float = 60.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` local processes joined by a gloo/nccl group.

    The rendezvous is on 127.0.0.1 at a free port. If any worker fails, the exception is raised here (the
    remaining workers stop at their next collective, within ``timeout_s``).
    """
    if world_size < 1:
        raise ConfigError(f"distributed.world_size must be >= 1, got {world_size}.")
    import torch.multiprocessing as mp

    port = find_free_port()
    mp.start_processes(
        _worker_entry, args=(fn, world_size, port, timeout_s, tuple(args)), nprocs=world_size, join=True,
        start_method="spawn",
    )


def _worker_entry(rank: int, fn, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Each worker gets its share of the cores, so N workers do not oversubscribe the machine.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    init_from_env(timeout_s=timeout_s)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's teardown: in torch 2.14, gloo's C++ objects can abort the process while
    # static destructors run after a clean finish ("terminate called without an active exception", about one
    # exit in ten here), which the launcher would report as a crashed worker. Everything is written by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        self.stats = CommStats()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def describe(self) -> Dict[str, object]:
        return {**self.estimator.describe(), "world_size": self.world_size}

    def shard(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """This rank's contiguous slice (along dim 0) of each tensor; sets the weight ``n_r / N``."""
        n = tensors[0].shape[0]
        parts = [torch.tensor_split(t, self.world_size, dim=0)[self.rank] for t in tensors]
        self.weight = parts[0].shape[0] / n if n else 0.0
        return tuple(parts)

    def _all_reduce(self, t: Tensor) -> Tensor:
        self.stats.bytes_allreduced += t.numel() * t.element_size()
        self.stats.calls += 1
        if self.world_size == 1:
            return t
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        except Exception as exc:  # gloo raises RuntimeError (or DistBackendError) on a lost peer / timeout
            raise WorkerLostError(
                f"rank {self.rank}: an all-reduce failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                "Another worker probably died or stopped answering; this worker stops too. Check the other "
                "workers' logs for the original error."
            ) from exc
        return t

    def __call__(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        self.stats = CommStats()
        est = self.estimator
        w = self.weight
        if isinstance(est, DirectionalEstimator):
            p, single = as_param_dict(params)
            p = {name: t.detach() for name, t in p.items()}
            # The estimator's own draw, as in its __call__ (rank-one factors, regenerated tangents, reused
            # buffers): identical on every rank, since the ranks share the seed and the call sequence.
            draw = est.draw(p)
            loss, d = est.directional_derivatives(loss_fn, p, draw.tangents, single)
            # One all-reduce of k + 1 scalars: the weighted local loss and directional derivatives.
            packed = self._all_reduce(torch.cat([loss.reshape(1), d]).to(torch.float64) * w)
            loss, d = packed[0].to(loss.dtype), packed[1:].to(d.dtype)
            return loss, from_param_dict(est.estimate(draw, d), single)
        loss, grads = est(loss_fn, params)
        g, single = as_param_dict(grads)
        names = list(g)
        flat = torch.cat([loss.reshape(1).to(g[names[0]].dtype)] + [g[n].reshape(-1) for n in names]) * w
        flat = self._all_reduce(flat)
        out, offset = {}, 1
        for n in names:
            out[n] = flat[offset: offset + g[n].numel()].view_as(g[n])
            offset += g[n].numel()
        return flat[0].to(loss.dtype), from_param_dict(out, single)
