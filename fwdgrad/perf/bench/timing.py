"""How the benchmark measures: interleaved rounds of timed samples and peak memory, per (model, batch) group."""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from fwdgrad.perf.bench.workloads import Variant, build_model, make_step, passes
from fwdgrad.perf.memory import RssPeak, tensor_peak_mib

log = logging.getLogger("bench")


@dataclass
class Result:
    model: str
    batch: int
    variant: str
    distribution: str
    k: int
    backend: str
    median_ms: float
    min_ms: float
    q25_ms: float
    q75_ms: float
    samples: int
    inner: int
    peak_mib: float
    rss_mib: float
    r_f: float = math.nan
    fg_over_bp: float = math.nan
    threads: int = 0  # torch threads the row ran with
    passes: str = ""


# -- memory ------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak tensor memory and resident-set growth of a call (see :mod:`fwdgrad.perf.memory`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss = RssPeak() if device.type == "cpu" else None
        self.note = ("tensor memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "torch CPU allocations from the profiler's memory events")
                     + " minus memory allocated before; RSS: "
                     + ("not measured (CUDA)" if self.rss is None else
                        "resident-set high-water mark minus resident set before"
                        if self.rss.source == "rss_hwm_delta" else "ru_maxrss growth (may read 0)")
                     + "; each over the first two steps of a fresh estimator")

    def measure(self, make: Callable[[], Callable[[], None]]) -> tuple[float, float]:
        """``(tensor peak MiB, RSS growth MiB)`` of the first two calls of a fresh ``make()``, each measured
        on its own fresh one (the profiler's bookkeeping would inflate the RSS)."""
        def two_steps() -> None:
            fn = make()
            fn()
            fn()

        peak = tensor_peak_mib(two_steps, self.device)
        if self.rss is None:
            return peak, math.nan
        self.rss.start()
        two_steps()
        return peak, self.rss.peak_mib()


# -- timing ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


#: Clocks for the samples: wall time (default), or the calling thread's CPU time, which a shared machine's
#: other processes cannot inflate by preempting us (only meaningful with one torch thread: --threads 1).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_group(
    steps: Dict[str, Callable[[], None]],
    warm_s: Dict[str, float],
    device: torch.device,
    rounds: int,
    min_sample_s: float,
    budget_s: float,
    rng: random.Random,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, tuple[List[float], int]]:
    """Interleaved timing: ``rounds`` shuffled passes over all steps (at least 3, fewer than ``rounds`` only
    when the group exceeds ``budget_s``). ``warm_s``: each step's warm-up duration, which sets how many steps
    one sample times. Returns per step the per-call times of each sample and ``inner``."""
    # steps per sample, from the warm-up call's duration (a first call is if anything slower: fewer steps)
    inner = {name: max(1, min(50, math.ceil(min_sample_s / max(warm_s[name], 1e-6)))) for name in steps}
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    order = list(steps)
    for r in range(rounds):
        if r >= 3 and time.perf_counter() - start > budget_s:
            log.info("  time budget reached after %d rounds", r)
            break
        rng.shuffle(order)
        for name in order:
            fn, n = steps[name], inner[name]
            _sync(device)
            t = clock()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((clock() - t) / n)
    return {name: (samples[name], inner[name]) for name in steps}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bench_group(
    model_name: str, batch: int, vs: Sequence[Variant], args: argparse.Namespace, mem: PeakMemory,
    device: torch.device, rng: random.Random,
) -> List[Result]:
    models = {}
    for local, groups in sorted({(False, 1), *((v.local, v.groups) for v in vs)}):
        torch.manual_seed(0)  # the same network (same seed); the local ones have auxiliary heads as well
        models[local, groups] = build_model(model_name, args.quick, local, groups).to(device)
    model = models[False, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    # warm-up of the whole group (lazy library initialisation must not count for the first row's memory)
    for v in vs[:3]:
        make_step(v, model, x, y)()
    steps: Dict[str, Callable[[], None]] = {}
    peaks: Dict[str, tuple[float, float]] = {}
    warm: Dict[str, float] = {}
    for v in vs:  # two warm-up steps per configuration = its memory measurement, with a fresh estimator
        m = models[v.local, v.groups]
        peaks[v.label] = mem.measure(lambda: make_step(v, m, x, y))
        m.zero_grad(set_to_none=True)
        fn = make_step(v, m, x, y)
        t = time.perf_counter()
        fn()
        warm[v.label] = time.perf_counter() - t
        steps[v.label] = fn
        m.zero_grad(set_to_none=True)
    timed = time_group(steps, warm, device, args.repeats, args.min_sample_ms / 1e3, args.group_budget_s, rng,
                       CLOCKS[args.clock])
    out = []
    for v in vs:
        xs, inner = timed[v.label]
        out.append(Result(
            model_name, batch, v.label, v.distribution, v.k, v.backend,
            median_ms=statistics.median(xs) * 1e3, min_ms=min(xs) * 1e3,
            q25_ms=_quantile(xs, 0.25) * 1e3, q75_ms=_quantile(xs, 0.75) * 1e3,
            samples=len(xs), inner=inner, peak_mib=peaks[v.label][0], rss_mib=peaks[v.label][1],
            threads=torch.get_num_threads(),
            passes=passes(v),
        ))
    fwd = next(r for r in out if r.variant == "forward").median_ms
    bp = next(r for r in out if r.variant == "backprop").median_ms
    for r in out:
        r.r_f = r.median_ms / fwd
        r.fg_over_bp = r.median_ms / bp
    return out
