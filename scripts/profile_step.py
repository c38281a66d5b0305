"""Op-level profile of one gradient step: forward gradient (fast engine) against a backprop step.

    .venv/bin/python scripts/profile_step.py --batch 64 --threads 1
    .venv/bin/python scripts/profile_step.py --batch 1024 --threads 2 --variants "normal:1,rank1:1,backprop"
    .venv/bin/python scripts/profile_step.py --batch 1024 --threads 1 --variants "fga:1,local-fga:1,backprop"

Robust on a busy machine (unlike wall-clock ratios): per variant it reports the number of ATen ops a step
launches, their *self* CPU time summed by op name (torch.profiler), the step's thread CPU time, and the share
of the step spent in Python (the step's CPU time minus the ATen ops' self time). The model is the benchmark's
MLP 784-1024-1024-10 (scripts/bench.py) on random data, the step ``estimate_module_grads`` as bench.py times it.
Used for docs/performance-scaling.md.

``--spin-check`` instead measures, at ``--threads`` (use 2), the process CPU time (all threads) of: a chunked
normal fill of the MLP's 1.86M tangent entries run serially and on the estimator's thread pool, a 1M-float
``add_`` (one OpenMP parallel region), and the pool fill right after such a region. The OpenMP runtime's
worker keeps spinning after a region (libgomp: ``GOMP_SPINCOUNT``/``OMP_WAIT_POLICY``), which shows as CPU
time beyond the region's work. The script opts in to a short spin (``GOMP_SPINCOUNT=10000``, fwdgrad.perf.openmp);
compare with ``GOMP_SPINCOUNT=300000`` (libgomp's default) or ``OMP_WAIT_POLICY=PASSIVE`` in the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwdgrad.app.process import prepare_process  # noqa: E402

prepare_process()  # first: the experiments extra, then opt-in process settings (before torch loads)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from fwdgrad import Backprop, ForwardActivity, ForwardGradient, GradientEstimator, estimate_module_grads  # noqa: E402
from fwdgrad.app.cli import run_cli  # noqa: E402
from fwdgrad.nn.functional import cross_entropy, per_example_cross_entropy  # noqa: E402
from fwdgrad.perf.memory import tune_malloc  # noqa: E402
from fwdgrad.nn.models import MLP  # noqa: E402

log = logging.getLogger("profile_step")


def make_step(variant: str, batch: int) -> Callable[[], None]:
    """``variant``: ``backprop``, ``<distribution>:<k>`` (e.g. ``normal:1``, ``rank1:1``), ``fga:<k>`` (activity
    perturbation); a ``local-`` prefix trains the same MLP with local losses (LG-BP, LG-FG-W, LG-FG-A)."""
    local = variant.startswith("local-")
    variant = variant[len("local-"):] if local else variant
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, (1024, 1024), local_losses=local)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    loss = per_example_cross_entropy if variant.startswith("fga") else cross_entropy
    if variant == "backprop":
        est: GradientEstimator = Backprop()
    elif variant.startswith("fga:"):
        est = ForwardActivity(int(variant.split(":")[1]), "mean", "normal", seed=0)
    else:
        dist, k = variant.split(":")
        est = ForwardGradient(int(k), "mean", dist, seed=0)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        estimate_module_grads(est, model, lambda out: loss(out, y), x)

    return step


def op_table(step: Callable[[], None], steps: int) -> Tuple[Dict[str, Tuple[int, float]], float]:
    """Per ATen op name: (calls per step, self CPU us per step); and the step's thread CPU ms (unprofiled)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    table: Dict[str, List[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        table[e.key][0] += e.count / steps
        table[e.key][1] += e.self_cpu_time_total / steps
    t = time.thread_time()
    for _ in range(steps):
        step()
    cpu_ms = (time.thread_time() - t) * 1e3 / steps
    return {k: (int(round(v[0])), v[1]) for k, v in table.items()}, cpu_ms


def report(variant: str, batch: int, threads: int, steps: int, top: int) -> List[str]:
    step = make_step(variant, batch)
    for _ in range(3):  # warm-up: buffers, the memory policy's first measurement, lazy init
        step()
    table, cpu_ms = op_table(step, steps)
    aten = {k: v for k, v in table.items() if k.startswith("aten::")}
    # self time of top-level ATen ops only would double count nothing: self time excludes children
    self_ms = sum(v[1] for v in aten.values()) / 1e3
    calls = sum(v[0] for v in aten.values())
    lines = [f"### {variant}, batch {batch}, {threads} thread(s)", "",
             f"ATen ops per step: {calls}; their self CPU time {self_ms:.2f} ms/step (profiled); thread CPU time "
             f"of the step {cpu_ms:.2f} ms (unprofiled; with 2 threads the other thread's work is not in it)", "",
             "| op | calls/step | self CPU us/step |", "|---|---:|---:|"]
    for name, (n, us) in sorted(aten.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {name} | {n} | {us:.0f} |")
    return lines + [""]


def spin_check(trials: int = 40) -> List[str]:
    """Process CPU time (min and lower quartile over ``trials``) of the calls listed in the module docstring."""
    from fwdgrad.estimators.tangents.rng import ChunkedRNG, run_serial
    from fwdgrad.estimators.tangents.distributions import Normal

    rng, op = ChunkedRNG(), Normal().fill_jobs
    buf, big = torch.empty(1863690), torch.ones(1024, 1024)

    def pool_fill() -> None:
        rng.run(op(rng, buf, 0)[0])

    def region_then_fill() -> None:
        big.add_(1.0)
        pool_fill()

    calls = {"serial fill": lambda: run_serial(op(rng, buf, 0)[0]), "pool fill": pool_fill,
             "add_ (1M floats)": lambda: big.add_(1.0), "add_ then pool fill": region_then_fill}
    lines = ["| call | process CPU ms (min) | (lower quartile) |", "|---|---:|---:|"]
    for name, fn in calls.items():
        cpu = []
        for _ in range(trials):
            t = time.process_time()
            fn()
            cpu.append((time.process_time() - t) * 1e3)
        cpu.sort()
        lines.append(f"| {name} | {cpu[0]:.2f} | {cpu[trials // 4]:.2f} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="profiled steps per variant (averaged)")
    p.add_argument("--top", type=int, default=15, help="ops listed per variant")
    p.add_argument("--variants", default="normal:1,rank1:1,backprop")
    p.add_argument("--spin-check", action="store_true", help="the OpenMP spin check (module docstring)")
    args = p.parse_args(argv)

    def go() -> int:
        torch.set_num_threads(args.threads)
        tune_malloc()  # as scripts/bench.py and training do: freed memory is reused, not page-faulted in again
        if args.spin_check:
            log.info("\n".join(spin_check()))
            return 0
        out: List[str] = []
        for v in args.variants.split(","):
            out += report(v.strip(), args.batch, args.threads, args.steps, args.top)
        log.info("\n".join(out))
        return 0

    return run_cli("profile_step.py", go)


if __name__ == "__main__":
    sys.exit(main())
