"""The benchmark's command line and the order of its runs (``make bench`` = ``python -m fwdgrad.perf.bench``)."""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from fwdgrad.app.cli import run_cli
from fwdgrad.perf.bench.report import TARGETS, machine_info, write_outputs
from fwdgrad.perf.bench.studies import deep_mlp_memory, estimator_quality, training_loop_overhead
from fwdgrad.perf.bench.timing import CLOCKS, PeakMemory, Result, bench_group
from fwdgrad.perf.bench.workloads import (
    BENCH_MODELS,
    FROG_MODELS,
    LOCAL_MIXERS,
    BenchError,
    Variant,
    build_model,
    compiled_variants,
    frog_variants,
    local_mixer_variants,
    peer_variants,
    variants,
)
from fwdgrad.perf.memory import tune_malloc

log = logging.getLogger("bench")


# -- main --------------------------------------------------------------------------------------------------
def int_list(text: str, what: str, zero_ok: bool = False) -> List[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; a :class:`BenchError` naming ``--what`` for anything else (or 0 unless allowed)."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--{what} takes comma-separated integers (e.g. 1,4,16), got {text!r}.") from None
    if any(v < (0 if zero_ok else 1) for v in vals):
        raise BenchError(f"--{what} values must be >= {0 if zero_ok else 1}, got {text!r}.")
    return vals


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(BENCH_MODELS), help="comma-separated: " + ", ".join(BENCH_MODELS))
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--frog-batches", default="64",
                   help=f"batch sizes of the Section 4.5 models ({', '.join(FROG_MODELS)}; frog's MNIST batch is 64)")
    p.add_argument("--local-mixer-batches", default="128",
                   help=f"batch sizes of the LocalMixer models ({', '.join(LOCAL_MIXERS)}; the recipes' batch is 128)")
    p.add_argument("--ks", default="1,4,16", help="numbers of tangents")
    p.add_argument("--distributions", default="normal,counter_normal,rademacher,rank1")
    p.add_argument("--func-ks", default="1,16",
                   help="k values also run on the torch.func reference path (normal tangents); the conv net "
                        "gets only k=1 there unless --func-convnet")
    p.add_argument("--func-convnet", action="store_true", help="run every --func-ks on the conv net too")
    p.add_argument("--peer-ks", default="1,4,16",
                   help="k values of the peer rows (MLP only; '' for none): a whole SGD step of fwdgrad's forward "
                        "gradient beside torchzero's ForwardGradient and a torch.func.jvp loop")
    p.add_argument("--compiled-ks", default="",
                   help="k values of the torch.compile rows (MLP only; '' for none, the default: compiling takes "
                        "minutes): a compiled backprop step beside a compiled torch.func.jvp step per k")
    p.add_argument("--zo-ks", default="1,16", help="k values of the zeroth-order rows (MLP only; empty: none)")
    p.add_argument("--simulated-ks", default="16", help="k values also run as the simulated forward gradient "
                   "(backend='simulated': a backprop gradient projected on the tangents; normal tangents; MLP only)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (samples per row)")
    p.add_argument("--min-sample-ms", type=float, default=30.0)
    p.add_argument("--group-budget-s", type=float, default=60.0,
                   help="stop adding rounds to a (model, batch) group after this long (at least 3 rounds)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--target-threads", default="1",
                   help="comma-separated thread counts (0: torch's default) at which the targets' MLP rows "
                        "are run again after the main table ('' for none; a count equal to --threads is "
                        "skipped): the targets hold at all cores and at one thread")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or (with --threads 1 on a busy shared machine) the thread's CPU time")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="tune glibc's malloc thresholds first (fwdgrad.perf.memory.tune_malloc, what the training "
                        "entry points do); off by default, so that the rows are what a user's own script gets")
    p.add_argument("--deep-layers", type=int, default=32)
    p.add_argument("--deep-width", type=int, default=1024)
    p.add_argument("--deep-batch", type=int, default=2048)
    p.add_argument("--no-deep", action="store_true", help="skip the deep-MLP memory check")
    p.add_argument("--quality-draws", type=int, default=20,
                   help="estimates per (distribution, k) for the cosine/variance table (0 skips it)")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, batch 8, k=1,2, 2 rounds: checks the pipeline in seconds")
    p.add_argument("--out", default=None, help="output directory (default outputs/bench/<timestamp>)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.frog_batches, args.ks, args.func_ks = "8", "8", "1,2", "1,2"
        args.local_mixer_batches = "8"
        args.zo_ks, args.simulated_ks, args.peer_ks = "1,2", "2", "1,2"
        args.repeats, args.min_sample_ms, args.quality_draws = 2, 1.0, min(args.quality_draws, 3)
    if args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}.")
    return args


def run(args: argparse.Namespace) -> Path:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        build_model(m, True)  # validates the name before any long work
    batches, ks, func_ks = int_list(args.batches, "batches"), int_list(args.ks, "ks"), int_list(args.func_ks, "func-ks")
    zo_ks, sim_ks = int_list(args.zo_ks, "zo-ks"), int_list(args.simulated_ks, "simulated-ks")
    peer_ks, compiled_ks = int_list(args.peer_ks, "peer-ks"), int_list(args.compiled_ks, "compiled-ks")
    frog_batches = int_list(args.frog_batches, "frog-batches")
    mixer_batches = int_list(args.local_mixer_batches, "local-mixer-batches")
    dists = [d.strip() for d in args.distributions.split(",") if d.strip()]
    from fwdgrad import TANGENT_DISTRIBUTIONS

    bad = [d for d in dists if d not in TANGENT_DISTRIBUTIONS]
    if bad:
        raise BenchError(f"unknown distribution(s) {bad}; allowed: {', '.join(TANGENT_DISTRIBUTIONS)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (torch.get_num_threads() != 1 or args.device != "cpu"):
        raise BenchError("--clock thread counts only the calling thread's CPU time: use it with --threads 1 on "
                         "the CPU (or use --clock wall).")
    if args.clock == "thread" and any(t != 1 for t in int_list(args.target_threads, "target-threads", zero_ok=True)):
        raise BenchError(f"--clock thread needs one thread, but --target-threads {args.target_threads!r} asks "
                         "for other counts: pass --target-threads 1 (or '') with --clock thread.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but CUDA is not available; use --device cpu.")
    out = Path(args.out) if args.out else Path("outputs") / "bench" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"output directory {out} is not empty; pass a new --out (results are never overwritten).")
    info = machine_info(device)
    info["malloc_tuned"] = tune_malloc() if args.malloc_tuning else False
    info["clock"] = args.clock
    mem = PeakMemory(device)
    rng = random.Random(0)
    log.info("machine: %s", info)
    results: List[Result] = []
    t0 = time.perf_counter()
    for m in models:
        fks = func_ks if (m == "mlp" or args.func_convnet) else [k for k in func_ks if k == 1]
        extra = (zo_ks, sim_ks) if m == "mlp" else ((), ())  # zeroth-order and simulated rows: the MLP only
        vs = (frog_variants(ks, func_ks) if m in FROG_MODELS else local_mixer_variants() if m in LOCAL_MIXERS
              else variants(ks, dists, fks, *extra))
        if m == "mlp":
            vs += peer_variants(peer_ks) + compiled_variants(compiled_ks)
        for b in (frog_batches if m in FROG_MODELS else mixer_batches if m in LOCAL_MIXERS else batches):
            log.info("%s batch %d: %d configurations", m, b, len(vs))
            group = bench_group(m, b, vs, args, mem, device, rng)
            for r in group:
                log.info("  %-28s %9.2f ms  R_f %6.2f  fg/bp %5.2f  peak %7.1f MiB",
                         r.variant, r.median_ms, r.r_f, r.fg_over_bp, r.peak_mib)
            results += group
    results += run_target_threads(args, ks, dists, batches, mem, device, rng)
    deep = None if args.no_deep else deep_mlp_memory(args, mem, device)
    if deep is not None:
        log.info("deep MLP: %s", deep)
    quality = estimator_quality(args, ks, dists) if args.quality_draws > 0 else []
    loop = training_loop_overhead(args)
    log.info("training loop: %s", loop["note"])
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    write_outputs(out, info, results, deep, quality, loop, mem.note, args)
    log.info("wrote %s (%.0f s)", out, time.perf_counter() - t0)
    return out


def target_runs(args: argparse.Namespace, ks: Sequence[int], dists: Sequence[str],
                batches: Sequence[int]) -> List[tuple[int, int, List[Variant]]]:
    """``(threads, batch, variants)`` groups that repeat the targets' MLP rows at each ``--target-threads``
    count other than the main run's (so that ``make bench`` checks the targets at all cores AND at one
    thread). ``--quick`` uses its own batch, so that the pipeline is exercised."""
    counts = [t for t in dict.fromkeys(int_list(args.target_threads, "target-threads", zero_ok=True))
              if (t or torch.get_num_threads()) != torch.get_num_threads()] if args.target_threads else []
    wanted = sorted({b for _, b, _, _ in TARGETS} & set(batches)) or (list(batches[:1]) if args.quick else [])
    tks = [k for k in ks if k in (1, 16)] or list(ks[:1])
    fg = [Variant("fg", d, k, "auto") for d in ("normal", "counter_normal", "rank1") if d in dists for k in tks]
    return [(t, b, [Variant("forward"), Variant("backprop"), *fg]) for t in counts for b in wanted]


def run_target_threads(args: argparse.Namespace, ks: Sequence[int], dists: Sequence[str], batches: Sequence[int],
                       mem: PeakMemory, device: torch.device, rng: random.Random) -> List[Result]:
    """The :func:`target_runs` groups, each at its thread count (the main count restored after)."""
    main_threads, out = torch.get_num_threads(), []
    for threads, batch, vs in target_runs(args, ks, dists, batches):
        torch.set_num_threads(threads or main_threads)
        log.info("mlp batch %d at %d thread(s), for the targets: %d configurations", batch,
                 torch.get_num_threads(), len(vs))
        try:
            group = bench_group("mlp", batch, vs, args, mem, device, rng)
        finally:
            torch.set_num_threads(main_threads)
        for r in group:
            log.info("  %-28s %9.2f ms  fg/bp %5.2f", r.variant, r.median_ms, r.fg_over_bp)
        out += group
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def bench() -> int:
        out = run(parse_args(argv))
        log.info("\n%s", (out / "bench.md").read_text())
        return 0

    return run_cli("bench.py", bench)
