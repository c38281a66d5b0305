"""Data-parallel runs: start and supervise one worker process per rank, and set up ``torch.distributed`` in each.

``launch_workers`` spawns the ranks of a ``distributed.world_size > 1`` training run and supervises them (a rank
that dies is reported by name, the others stop); ``init_from_env`` joins a group started by ``torchrun``; the
estimate itself is :class:`fwdgrad.parallel.DataParallelEstimator`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from fwdgrad.errors import ConfigError, WorkerLostError

__all__ = ["configure_logging", "env_world_size", "find_free_port", "init_from_env", "launch_workers",
           "logging_spec"]

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


#: How often the launcher looks at its workers, and the margin it gives them beyond ``timeout_s`` to stop.
_POLL_S, _MARGIN_S = 0.5, 10.0


def launch_workers(fn: Callable[..., None], world_size: int, args: Sequence = (), timeout_s: float = 60.0,
                   poll: Optional[Callable[[List[int]], None]] = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` local processes joined by a gloo/nccl group.

    The rendezvous is on 127.0.0.1 at a free port. The launcher supervises the workers until all have finished:

    * a worker that raised: the others stop at their next collective (:class:`WorkerLostError` within
      ``timeout_s``); torch's ``ProcessRaisedException`` is raised here, its message holding the traceback;
    * a worker killed by a signal or exiting with an error status without a Python error: the others get
      ``timeout_s`` (plus a margin) to stop by themselves, then are terminated; raises :class:`WorkerLostError`
      with one paragraph saying which worker and how;
    * workers still running ``timeout_s`` (plus a margin) after another one finished cleanly are hung: they are
      terminated and :class:`WorkerLostError` is raised;
    * ``poll(pids)`` is called about twice a second with the live workers' process ids (the training launcher
      forwards stop signals through it).

    If the launcher itself is interrupted (``KeyboardInterrupt``), the workers are killed before it re-raises.
    """
    if world_size < 1:
        raise ConfigError(f"distributed.world_size must be >= 1, got {world_size}.")
    import torch.multiprocessing as mp

    port = find_free_port()
    context = mp.start_processes(
        _worker_entry, args=(fn, world_size, port, timeout_s, tuple(args)), nprocs=world_size, join=False,
        start_method="spawn",
    )
    try:
        _supervise(context, timeout_s + _MARGIN_S, poll)
    except BaseException:
        for proc in context.processes:  # leave no orphan behind (a worker also dies with its launcher, below)
            if proc.is_alive():
                proc.kill()
        raise


def _supervise(context: Any, grace_s: float, poll: Optional[Callable[[List[int]], None]]) -> None:
    """Join the workers of ``context`` (a ``torch.multiprocessing.ProcessContext``), see :func:`launch_workers`."""
    from torch.multiprocessing import ProcessExitedException

    first_done: Optional[float] = None
    while True:
        try:
            if context.join(timeout=_POLL_S, grace_period=grace_s):
                return
        except ProcessExitedException as err:
            raise WorkerLostError(_exit_message(err, grace_s)) from None
        alive = [proc for proc in context.processes if proc.is_alive()]
        if poll is not None:
            poll([proc.pid for proc in alive])
        if len(alive) == len(context.processes):
            continue
        first_done = time.monotonic() if first_done is None else first_done
        if time.monotonic() - first_done > grace_s:
            hung = [rank for rank, proc in enumerate(context.processes) if proc.is_alive()]
            for proc in alive:
                proc.kill()
                proc.join()
            raise WorkerLostError(
                f"data-parallel worker(s) {', '.join(map(str, hung))} still ran {grace_s:.0f} s after another "
                "worker had finished, and were stopped: they hung outside a collective (which would have timed "
                "out after distributed.timeout_s). What rank 0 wrote before is kept."
            )


def _exit_message(err: Any, grace_s: float) -> str:
    """One paragraph for a worker that ended without a Python error (``ProcessExitedException``)."""
    rank, pid = getattr(err, "error_index", "?"), getattr(err, "pid", None) or getattr(err, "error_pid", "?")
    signal_name = getattr(err, "signal_name", None)
    if signal_name:
        how = f"was killed by {signal_name}"
        if signal_name == "SIGKILL":
            how += (" (the kernel's out-of-memory killer and job schedulers send SIGKILL; `dmesg` or the "
                    "scheduler's log tells which)")
    else:
        how = (f"exited with status {getattr(err, 'exit_code', '?')} without a Python error (a crash in native "
               "code, or os._exit)")
    return (f"data-parallel worker {rank} (pid {pid}) {how}. The other workers stop by themselves at their next "
            f"all-reduce, or are terminated after {grace_s:.0f} s.")


def _die_with_parent() -> None:
    """Linux: have the kernel send this worker SIGTERM when its launcher dies, even by SIGKILL, so that no worker
    trains on orphaned (SIGTERM stops a training worker cleanly, at its next step boundary)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc/musl: the worker just does not follow its launcher
        pass


def _worker_entry(rank: int, fn, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    _die_with_parent()
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


# -- the workers' logging: rank 0's records go where the launcher's go ------------------------------------------
def logging_spec() -> List[Dict[str, Any]]:
    """The root logger's handlers as plain data (kind, target, level, format), for :func:`configure_logging` in
    a spawned worker: a spawned process starts with no logging configuration at all."""
    spec = []
    root = logging.getLogger()
    for handler in root.handlers:
        fmt = handler.formatter
        entry = {"level": handler.level, "format": fmt._fmt if fmt else None, "datefmt": fmt.datefmt if fmt else None}
        if isinstance(handler, logging.FileHandler):
            spec.append({**entry, "file": handler.baseFilename})
        elif isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            spec.append({**entry, "stream": "stdout" if handler.stream is sys.stdout else "stderr"})
    return [{"root_level": root.level}] + spec


def configure_logging(spec: List[Dict[str, Any]], rank: int) -> None:
    """Give this worker the launcher's handlers (:func:`logging_spec`): rank 0 logs as a single process would
    (console and ``<job>.log``, appended to), other ranks only warnings and errors, marked with their rank."""
    root = logging.getLogger()
    root.setLevel(spec[0]["root_level"] if rank == 0 else logging.WARNING)
    for entry in spec[1:]:
        if "file" in entry:
            handler: logging.Handler = logging.FileHandler(entry["file"], mode="a")
        else:
            handler = logging.StreamHandler(sys.stdout if entry["stream"] == "stdout" else sys.stderr)
        fmt = entry["format"] if rank == 0 or not entry["format"] else entry["format"].replace(
            "%(message)s", f"rank {rank}: %(message)s")
        handler.setFormatter(logging.Formatter(fmt, entry["datefmt"]))
        handler.setLevel(entry["level"])
        root.addHandler(handler)
