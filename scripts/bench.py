"""Benchmark: time per training step of forward gradients against backprop, measured side by side.

    make bench                                     # = .venv/bin/python scripts/bench.py (every model below)
    .venv/bin/python scripts/bench.py --models mlp,convnet             # the MLP and conv net (6-9 min, 2 cores)
    .venv/bin/python scripts/bench.py --models lenet5,resnet18,vit,mlp_mixer --device cuda   # Section 4.5 models
    .venv/bin/python scripts/bench.py --models mlp --batches 1024 --ks 1,16 --repeats 9
    .venv/bin/python scripts/bench.py --quick      # tiny models: checks the pipeline in seconds
    .venv/bin/python scripts/bench.py --threads 1 --clock thread --models mlp --batches 64,1024 --ks 1,16

The targets (MLP 784-1024-1024-10) must hold at torch's default thread count (all cores) and at one thread:
after the main table, the targets' MLP rows run again at each ``--target-threads`` count (default ``1``; a
count equal to the main run's is skipped), and ``bench.md`` checks every target at every thread count.

Models: the MLP (784-1024-1024-10) and conv net at batches ``--batches`` with every tangent distribution, and
the multi-tangent paper's Section 4.5 models in frog's sizes (LeNet-5, ResNet-18 CIFAR variant, ViT 6x256,
MLP-Mixer 8x512; 1x28x28 inputs) at ``--frog-batches`` with dense normal tangents: k = 1, 4, 16 on the fast
engine (all k tangents in one batched pass, no loop over k) and the torch.func reference at k = 1. On the CPU
the Section 4.5 rows take long (ResNet-18 and MLP-Mixer at k = 16 most); a GPU runs them in minutes.

What is timed: one *gradient step*, ``estimate_module_grads(estimator, model, cross_entropy, x)``, i.e. the loss,
the gradient (exact or estimated: tangent drawing, forward-mode pass, aggregation) and writing ``p.grad``; the
optimizer update after it is the same for every variant and is left out. The baseline is one forward pass of
the loss under ``torch.no_grad()``. Reported per configuration, as in the paper:

    R_f = step / forward   (R_b for the backprop row)        fg/bp = step / backprop step

The zeroth-order rows (``zo``, MLP only; ``--zo-ks``) are ZerothOrder with central differences and the exact loss,
i.e. 2k + 1 no-grad forward passes per step; the full table's last column says what every step runs.
Rows: forward, backprop, weight-perturbed forward gradients (``fg``) per distribution and k, activity perturbation
(``fga``, FG-A) and, on the same network with auxiliary heads, local losses (prefix ``local``: LG-BP, LG-FG-W,
LG-FG-A) and local-gradient guesses (``local guess``); every ``fg/bp`` is against the plain network's backprop.

Method: for each (model, batch size) every configuration first runs two steps with a fresh estimator, as
warm-up and to measure its peak memory; then rounds visit all configurations in a shuffled order
(interleaved, so a slow phase of a shared machine hits every configuration alike), each sample timing
``inner`` back-to-back steps (enough for about ``--min-sample-ms``); the table shows medians over the rounds.
Everything runs in one process.

Peak memory (:mod:`fwdgrad.perf.memory`), over those first two steps of a fresh estimator (so buffers it keeps
between steps count, and the second step runs with what the first measured), above the memory before them:
``peak MiB`` is tensor memory (CUDA ``max_memory_allocated``; on the CPU the same, rebuilt from the
profiler's allocation events: exact and repeatable), ``RSS MiB`` the growth of the resident set over two
more steps of another fresh estimator, without the profiler (Linux ``VmHWM`` reset through
``/proc/self/clear_refs``; includes allocator caching and fragmentation, so noisier).

Outputs (``--out``, default ``outputs/bench/<timestamp>/``): ``bench.md`` (machine, table, targets, deep-MLP
memory check), ``bench.csv`` (every number, with spread), ``machine.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package lives next to scripts/
    sys.path.insert(0, str(ROOT))

import fwdgrad  # noqa: E402,F401  (first: it shortens OpenMP's spin before torch loads, fwdgrad.perf.openmp)
import torch  # noqa: E402
from torch import nn  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from fwdgrad import (Backprop, ForwardActivity, ForwardGradient, GradientEstimator, LocalGuess,  # noqa: E402
                     ZerothOrder, estimate_module_grads)
from fwdgrad.app.cli import run_cli  # noqa: E402
from fwdgrad.errors import ConfigError  # noqa: E402
from fwdgrad.perf.memory import RssPeak, tensor_peak_mib, tune_malloc  # noqa: E402
from fwdgrad.perf.openmp import openmp_spin_setting  # noqa: E402
from fwdgrad.nn.functional import cross_entropy, per_example_cross_entropy  # noqa: E402
from fwdgrad.nn.models import MLP, ConvNet, LeNet5, MLPMixer, ResNet, VisionTransformer  # noqa: E402

log = logging.getLogger("bench")
MIB = 2**20
SHAPE = (1, 28, 28)


class BenchError(ConfigError):
    """Bad command-line input (exit status 2, like argparse's own errors)."""


# -- configurations ------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row of the table: what runs as the step."""

    name: str  # forward | backprop | fg | fga (activity perturbation) | guess (local-gradient guesses) | zo
    distribution: str = ""
    k: int = 0
    backend: str = ""
    regenerate: Union[bool, str] = "auto"  # ForwardGradient's regenerate_tangents
    local: bool = False  # the model trains with local losses (fwdgrad.nn.local_losses): LG-BP, LG-FG-W, LG-FG-A
    groups: int = 1  # with local losses: unit groups per block, each with its own loss (model.local_groups)
    aggregation: str = "mean"  # ForwardGradient's aggregation

    @property
    def label(self) -> str:
        prefix = ("local " if self.local else "") + (f"{self.groups}-group " if self.groups > 1 else "")
        if self.name in ("fga", "zo"):
            return f"{prefix}{self.name} {self.distribution} k={self.k}"
        if self.name != "fg":
            return prefix + self.name
        suffix = {True: " regenerated", False: " kept", "auto": ""}[self.regenerate]
        suffix += "" if self.aggregation == "mean" else f" {self.aggregation}"
        backend = {"func": " (torch.func)", "simulated": " (simulated: backprop, then B^T g)"}
        return prefix + f"fg {self.distribution} k={self.k}" + backend.get(self.backend, suffix)


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


def passes(v: Variant) -> str:
    """What one step of ``v`` runs over the model: its cost in passes."""
    if v.name == "forward":
        return "1 no-grad forward"
    if v.name == "backprop":
        return "1 forward + 1 backward"
    if v.name == "zo":  # central differences, plus one pass for the exact loss f(theta)
        return f"{2 * v.k + 1} no-grad forwards"
    if v.name == "guess":  # each block's guess is its local-loss gradient, then one pass projects onto them
        return "1 forward + a backward inside each block, then 1 forward-mode pass"
    per_example = " per example and layer output" if v.name == "fga" else ""
    return f"1 forward-mode pass, {v.k} tangent{'s' if v.k > 1 else ''}{per_example}"


#: name -> (full size, --quick size); all on MNIST's 1x28x28 images. The last four are the models of the
#: multi-tangent paper's Section 4.5 (FROG_MODELS), in the sizes frog trains them.
BENCH_MODELS: Dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "mlp": (lambda: MLP(SHAPE, 10, (1024, 1024)), lambda: MLP(SHAPE, 10, (64, 64))),
    "convnet": (lambda: ConvNet(SHAPE, 10), lambda: ConvNet(SHAPE, 10, channels=4, hidden_size=32)),
    "lenet5": (lambda: LeNet5(SHAPE, 10), lambda: LeNet5(SHAPE, 10)),
    "resnet18": (lambda: ResNet(SHAPE, 10), lambda: ResNet(SHAPE, 10, width=4, blocks=(1, 1))),
    "vit": (lambda: VisionTransformer(SHAPE, 10),
            lambda: VisionTransformer(SHAPE, 10, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16)),
    "mlp_mixer": (lambda: MLPMixer(SHAPE, 10),
                  lambda: MLPMixer(SHAPE, 10, hidden_dim=16, token_mlp_dim=8, channel_mlp_dim=16, num_blocks=1)),
}
FROG_MODELS = ("lenet5", "resnet18", "vit", "mlp_mixer")


def build_model(name: str, quick: bool, local: bool = False, groups: int = 1) -> nn.Module:
    if name not in BENCH_MODELS:
        raise BenchError(f"unknown model {name!r}; use --models with any of {', '.join(BENCH_MODELS)} "
                         "(comma separated).")
    if local:  # the local-loss rows (issue 12): the MLP and conv net with auxiliary heads (and unit groups)
        if name == "mlp":
            return MLP(SHAPE, 10, (64, 64) if quick else (1024, 1024), local_losses=True, local_groups=groups)
        tiny = dict(channels=4 if groups == 1 else 16, hidden_size=32)  # --quick: channels that groups divide
        return ConvNet(SHAPE, 10, local_losses=True, local_groups=groups, **(tiny if quick else {}))
    return BENCH_MODELS[name][1 if quick else 0]()


def frog_variants(ks: Sequence[int], func_ks: Sequence[int]) -> List[Variant]:
    """The Section 4.5 models' rows: forward, backprop, dense normal tangents for each k (the fast engine), and
    the torch.func reference at k = 1."""
    return [Variant("forward"), Variant("backprop"), *[Variant("fg", "normal", k, "func") for k in func_ks if k == 1],
            *[Variant("fg", "normal", k, "auto") for k in ks]]


def variants(ks: Sequence[int], dists: Sequence[str], func_ks: Sequence[int],
             zo_ks: Sequence[int] = (), sim_ks: Sequence[int] = ()) -> List[Variant]:
    out = [Variant("forward"), Variant("backprop")]
    out += [Variant("fg", "normal", k, "func") for k in func_ks]
    out += [Variant("fg", "normal", k, "simulated") for k in sim_ks]  # frog's simfg: same estimate, for studies
    out += [Variant("fg", d, k, "auto") for d in dists for k in ks]
    if "normal" in dists and 1 in ks:  # the two ends of the default's memory/speed trade (regenerate "auto")
        out += [Variant("fg", "normal", 1, "auto", regenerate=False), Variant("fg", "normal", 1, "auto", regenerate=True)]
    if "normal" in dists and 16 in ks:  # issue 12's table: the projection onto 16 tangents (a 16 x 16 Gram solve more)
        out.append(Variant("fg", "normal", 16, "auto", aggregation="projection"))
    # activity perturbation and local losses (issue 12): FG-A, LG-BP, LG-FG-W, LG-FG-A (also with 16 unit groups),
    # local-gradient guesses
    out += [Variant("fga", "normal", 1), Variant("backprop", local=True), Variant("fg", "normal", 1, "auto", local=True),
            Variant("fga", "normal", 1, local=True), Variant("fga", "normal", 1, local=True, groups=16),
            Variant("guess", local=True)]
    return out + [Variant("zo", "normal", k) for k in zo_ks]


def make_step(v: Variant, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The callable timed for ``v``, with its own new estimator (its first call allocates its buffers)."""

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return per_example_cross_entropy(out, y)  # what the training loop passes (its mean is the loss)

    if v.name == "forward":
        def step() -> None:
            with torch.no_grad():
                cross_entropy(model(x), y)
        return step
    est = make_estimator(v)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        estimate_module_grads(est, model, loss_of, x)

    return step


def make_estimator(v: Variant) -> GradientEstimator:
    """A new estimator for the variant's row."""
    if v.name == "backprop":
        return Backprop()
    if v.name == "fga":
        return ForwardActivity(v.k, "mean", v.distribution, seed=0)
    if v.name == "guess":
        return LocalGuess()
    if v.name == "zo":
        return ZerothOrder(v.k, distribution=v.distribution, seed=0)
    return ForwardGradient(v.k, v.aggregation, v.distribution, seed=0, backend=v.backend,
                           regenerate_tangents=v.regenerate)


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


# -- the deep-MLP memory check and the training-loop row ------------------------------------------------------
DEEP_VARIANTS = (Variant("backprop"), Variant("fg", "normal", 1, "auto"), Variant("fg", "normal", 1, "auto", regenerate=False),
                 Variant("fg", "normal", 1, "auto", regenerate=True), Variant("fg", "rank1", 1, "auto"),
                 Variant("zo", "normal", 1))
#: The deep table's extra rows: the no-grad forward pass (the inference baseline) and the zeroth-order passes alone.
DEEP_FORWARD, DEEP_ZO_PASSES = "forward (no grad)", "zo normal k=1: passes only"


def zo_passes_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """A zeroth-order step without its estimate: the draw (seeds only) and the 3 perturbed no-grad passes,
    everything but building the n-float gradient the step returns."""
    from torch.func import functional_call

    est = ZerothOrder(1, seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def step() -> None:
        draw = est.draw(params)
        est.directional_derivatives(lambda p: cross_entropy(functional_call(model, p, (x,)), y), params, draw.tangents)

    return step


def deep_mlp_memory(args: argparse.Namespace, mem: PeakMemory, device: torch.device) -> Dict[str, object]:
    """Peak memory of a step on a deep, wide MLP: backprop stores every activation, forward mode none.

    Per variant: two steps of a fresh estimator are measured (their peak, as in the table), then one more
    is timed."""
    layers, width, batch = (4, 64, 16) if args.quick else (args.deep_layers, args.deep_width, args.deep_batch)
    torch.manual_seed(0)
    model = MLP((width,), 10, [width] * layers).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    res: Dict[str, object] = {"layers": layers, "width": width, "batch": batch,
                              "params_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB}
    make_step(Variant("backprop"), model, x, y)()  # lazy library initialisation must not count
    model.zero_grad(set_to_none=True)
    makers = [(v.label, lambda v=v: make_step(v, model, x, y)) for v in DEEP_VARIANTS]
    makers += [(DEEP_FORWARD, lambda: make_step(Variant("forward"), model, x, y)),
               (DEEP_ZO_PASSES, lambda: zo_passes_step(model, x, y))]
    for label, make in makers:
        peak, rss = mem.measure(make)
        model.zero_grad(set_to_none=True)
        fn = make()
        t = time.perf_counter()
        fn()
        res[label] = {"peak_mib": peak, "rss_mib": rss, "step_ms": (time.perf_counter() - t) * 1e3}
        model.zero_grad(set_to_none=True)
    bp, fwd = res["backprop"], res[DEEP_FORWARD]  # type: ignore[index]
    for label, _ in makers:
        r = res[label]  # type: ignore[index]
        r["over_bp"] = r["peak_mib"] / bp["peak_mib"] if bp["peak_mib"] else math.nan
        r["rss_over_bp"] = r["rss_mib"] / bp["rss_mib"] if bp["rss_mib"] else math.nan
        r["over_forward"] = r["peak_mib"] / fwd["peak_mib"] if fwd["peak_mib"] else math.nan
    return res


def estimator_quality(args: argparse.Namespace, ks: Sequence[int], dists: Sequence[str]) -> List[Dict[str, object]]:
    """What the speed buys: cosine similarity to the true gradient and E|g - a|^2 / |a|^2, measured over
    ``--quality-draws`` estimates and predicted by :mod:`fwdgrad.experiments.quality.structured`, per distribution and k."""
    from fwdgrad.estimators import cosine_similarity
    from fwdgrad.experiments.quality.structured import total_variance

    torch.manual_seed(0)
    model = build_model("mlp", args.quick)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    params = {n: p.detach() for n, p in model.named_parameters()}
    from torch.func import functional_call

    def loss_fn(p: Dict[str, torch.Tensor]) -> torch.Tensor:
        return cross_entropy(functional_call(model, p, (x,)), y)

    a = Backprop()(loss_fn, params)[1]
    a2 = sum(float(t.double().pow(2).sum()) for t in a.values())
    rows = []
    for dist in dists:
        for k in ks:
            est = ForwardGradient(k, "mean", dist, seed=5)
            cos, err = [], []
            for _ in range(args.quality_draws):
                ghat = est(loss_fn, params)[1]
                cos.append(cosine_similarity(ghat, a))
                err.append(sum(float((ghat[n].double() - a[n].double()).pow(2).sum()) for n in a) / a2)
            rows.append({"distribution": dist, "k": k, "cosine_mean": statistics.fmean(cos),
                         "cosine_sd": statistics.stdev(cos) if len(cos) > 1 else math.nan,
                         "rel_err_measured": statistics.fmean(err),
                         "rel_err_predicted": total_variance(a, dist, k) / a2})
    return rows


def training_loop_overhead(args: argparse.Namespace, rounds: int = 3, steps: int = 60) -> Dict[str, object]:
    """The MNIST training loop's own cost on top of the estimator step (target: at most +10%).

    Alternates ``rounds`` times between (a) ``fwdgrad.experiments.training.train`` for ``steps`` steps of the default MLP with
    forward gradients (k=1), batch 256, reading its median ``time/step_ms`` (batching, the optimizer and lr
    scheduler, logging and the train-accuracy pass included), and (b) a bare loop of the same estimator call
    alone, and of estimator + optimizer step, on the same data. Uses the real MNIST test set from
    ``../shared/data/mnist`` when present, else scikit-learn's digits.
    """
    import tempfile

    from hydra import compose, initialize_config_dir

    from fwdgrad.experiments.data import iterate_batches
    from fwdgrad.experiments.training import train

    shared = ROOT.parent / "shared" / "data" / "mnist"
    batch = 32 if args.quick else 256
    data = (["dataset=mnist", f"dataset.root={shared}", "dataset.test_set_split=2000"]
            if (shared / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file() else ["dataset=digits"])
    overrides = [*data, f"dataset.batch_size={batch}", f"optimization.max_steps={steps}", "log_every=20",
                 "progress_bar=false", "plot_misclassified=0", "device=cpu"]
    if args.quick:
        overrides.append("model.hidden_sizes=[64,64]")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("mnist_fwdgrad", overrides=overrides)
    splits = instantiate(cfg.dataset)
    torch.manual_seed(0)
    model = instantiate(cfg.model, input_shape=list(splits.input_shape), num_classes=splits.num_classes,
                        _convert_="all")
    est = instantiate(cfg.gradient)
    opt = instantiate(cfg.optimization.optimizer)(model.parameters())
    batches = list(iterate_batches(splits.train_x, splits.train_y, batch, torch.Generator().manual_seed(0)))
    batches = (batches * (steps // max(len(batches), 1) + 1))[:steps]

    def bare(with_optimizer: bool) -> float:
        t = time.perf_counter()
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            estimate_module_grads(est, model, lambda out, y=y: cross_entropy(out, y), x)
            if with_optimizer:
                opt.step()
        return (time.perf_counter() - t) * 1000 / len(batches)

    loop_ms, est_ms, est_opt_ms = [], [], []
    logging.getLogger("fwdgrad.experiments.training").setLevel(logging.WARNING)
    bare(True)  # warm-up
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            loop_ms.append(float(train(cfg, tmp)["step_time_ms"]))
        est_ms.append(bare(False))
        est_opt_ms.append(bare(True))
    lm, em, eom = (statistics.median(v) for v in (loop_ms, est_ms, est_opt_ms))
    note = (f"MLP {list(cfg.model.hidden_sizes)}, forward gradient k=1, batch {batch}, {data[0]}: train() "
            f"{lm:.2f} ms/step vs estimator alone {em:.2f} ms ({lm / em:.3f}x) and estimator + optimizer step "
            f"{eom:.2f} ms ({lm / eom:.3f}x); medians of {rounds} alternating runs of {steps} steps.")
    return {"note": note, "loop_ms": lm, "estimator_ms": em, "estimator_optimizer_ms": eom,
            "loop_over_estimator": lm / em, "loop_over_estimator_optimizer": lm / eom}


# -- reporting ---------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: Dict[str, object] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
        "openmp_wait": openmp_spin_setting(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def markdown_table(results: Sequence[Result]) -> str:
    lines = ["| model | batch | step | ms / step | R_f (× forward) | fg / bp | peak MiB | RSS MiB | passes / step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r.model} | {r.batch} | {r.variant} | {_fmt(r.median_ms)} | {_fmt(r.r_f)} | "
            f"{'—' if r.variant == 'forward' else _fmt(r.fg_over_bp)} | {_fmt(r.peak_mib, 1)} | {_fmt(r.rss_mib, 1)} | "
            f"{r.passes} |"
        )
    return "\n".join(lines)


def summary_table(results: Sequence[Result]) -> str:
    """Compact view: one row per step, one column per (model, batch); cells are fg/bp (R_f for forward)."""
    cols = list(dict.fromkeys((r.model, r.batch) for r in results))
    rows = list(dict.fromkeys(r.variant for r in results))
    cell = {(r.variant, r.model, r.batch): r for r in results}
    head = "| step | " + " | ".join(f"{m} {b}" for m, b in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for v in rows:
        vals = []
        for m, b in cols:
            r = cell.get((v, m, b))
            if r is None:
                vals.append("")
            elif v == "forward":
                vals.append(f"{r.median_ms:.1f} ms")
            elif v == "backprop":
                vals.append(f"{r.median_ms:.1f} ms (R_b {r.r_f:.2f})")
            else:
                vals.append(f"{r.fg_over_bp:.2f}")
        lines.append(f"| {v} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


#: The issue's targets (MLP 784-1024-1024-10): (label, batch, variant, bound on fg/bp).
TARGETS = [
    ("dense Gaussian k=1, batch 1024: fg/bp <= 1.15", 1024, "fg normal k=1", 1.15),
    ("dense Gaussian k=1, batch 64: fg/bp <= 2.5", 64, "fg normal k=1", 2.5),
    ("dense k=16, batch 1024: <= 14 x backprop", 1024, "fg normal k=16", 14.0),
    ("structured k=16, batch 1024: <= 6 x backprop", 1024, "fg rank1 k=16", 6.0),
    ("structured k=1, batch 1024: fg/bp <= 0.75", 1024, "fg rank1 k=1", 0.75),
    ("structured k=1, batch 64: fg/bp <= 0.9", 64, "fg rank1 k=1", 0.9),
    ("activity perturbation (FG-A) k=1, batch 1024: fg/bp <= 1.15", 1024, "fga normal k=1", 1.15),
    ("local-loss FG-A (LG-FG-A) k=1, batch 1024: fg/bp <= 1.0", 1024, "local fga normal k=1", 1.0),
]


def targets_report(results: Sequence[Result]) -> List[str]:
    """One line per target and thread count the results hold (the main run's, then ``--target-threads``)."""
    lines = []
    for threads in dict.fromkeys(r.threads for r in results):
        for label, batch, variant, bound in TARGETS:
            r = next((r for r in results if r.model == "mlp" and r.batch == batch and r.variant == variant
                      and r.threads == threads), None)
            if r is None:
                continue
            ok = "met" if r.fg_over_bp <= bound else "NOT met"
            lines.append(f"- {label}, {threads} thread{'s' if threads > 1 else ''}: measured "
                         f"{r.fg_over_bp:.2f} ({ok})")
    return lines


def target_runs(args: argparse.Namespace, ks: Sequence[int], dists: Sequence[str],
                batches: Sequence[int]) -> List[tuple[int, int, List[Variant]]]:
    """``(threads, batch, variants)`` groups that repeat the targets' MLP rows at each ``--target-threads``
    count other than the main run's (so that ``make bench`` checks the targets at all cores AND at one
    thread). ``--quick`` uses its own batch, so that the pipeline is exercised."""
    counts = [t for t in dict.fromkeys(_ints(args.target_threads, "target-threads", zero_ok=True))
              if (t or torch.get_num_threads()) != torch.get_num_threads()] if args.target_threads else []
    wanted = sorted({b for _, b, _, _ in TARGETS} & set(batches)) or (list(batches[:1]) if args.quick else [])
    tks = [k for k in ks if k in (1, 16)] or list(ks[:1])
    fg = [Variant("fg", d, k, "auto") for d in ("normal", "rank1") if d in dists for k in tks]
    return [(t, b, [Variant("forward"), Variant("backprop"), *fg]) for t in counts for b in wanted]
def zo_memory_lines(deep: Dict[str, object]) -> List[str]:
    """The zeroth-order memory check: its passes against a no-grad forward pass (target <= 1.1 x), and the whole
    step against the larger of that pass and the n-float gradient any estimator returns."""
    zo, passes_only = deep["zo normal k=1"], deep[DEEP_ZO_PASSES]  # type: ignore[index]
    grad_mib = float(deep["params_mib"])  # type: ignore[arg-type]
    floor = max(float(deep[DEEP_FORWARD]["peak_mib"]), grad_mib)  # type: ignore[index]
    ratio = passes_only["over_forward"]
    return [f"- zeroth order (dense normal, k=1, central, 3 no-grad passes): the passes peak at {ratio:.3f} x a "
            f"no-grad forward pass ({'met' if ratio <= 1.1 else 'NOT met'}: target <= 1.1); the whole step, which "
            f"also builds the {grad_mib:.0f} MiB gradient it returns, at {zo['peak_mib'] / floor:.3f} x "
            "max(no-grad forward pass, gradient)"]


def write_outputs(out: Path, info: Dict[str, object], results: Sequence[Result], deep: Optional[Dict[str, object]],
                  quality: Sequence[Dict[str, object]], loop: Dict[str, object], mem_note: str,
                  args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in results if r.threads == info["threads"]]
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()))
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    if quality:
        with open(out / "quality.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(quality[0].keys()))
            w.writeheader()
            w.writerows(quality)
    (out / "machine.json").write_text(json.dumps({"machine": info, "deep_mlp": deep, "training_loop": loop},
                                                 indent=2, default=str))
    md = ["# fwdgrad benchmark", "",
          f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else "")
          + (f"; load average at start {info.get('loadavg_start')}, at end {info.get('loadavg_end')}"
             if "loadavg_start" in info else "") + "; glibc malloc "
          + ("tuned to keep freed memory (fwdgrad.perf.memory.tune_malloc)" if info.get("malloc_tuned") else "defaults")
          + f"; OpenMP wait {info.get('openmp_wait')} (fwdgrad.perf.openmp).",
          "",
          f"Median of up to {args.repeats} interleaved samples per row (each of `inner` back-to-back steps), "
          f"{'wall-clock time' if args.clock == 'wall' else 'CPU time of the (single) computing thread'}. "
          "A step is the gradient computation that writes `p.grad` (the optimizer update is left out); "
          "R_f = step / forward pass (the backprop row's R_f is the paper's R_b); fg / bp = step / backprop "
          f"step. Peak memory: {mem_note}.", "",
          "Summary: forward and backprop step times, then every forward-gradient step as a multiple of the "
          "backprop step (fg / bp):", "", summary_table(main), "", "Full table:", "",
          markdown_table(main), ""]
    for threads in dict.fromkeys(r.threads for r in results if r.threads != info["threads"]):
        md += [f"The targets' rows again at {threads} thread{'s' if threads > 1 else ''} (`--target-threads`):", "",
               markdown_table([r for r in results if r.threads == threads]), ""]
    tl = targets_report(results)
    if tl:
        md += ["Targets (MLP 784-1024-1024-10):", "", *tl, ""]
    if deep is not None:
        md += [f"Deep MLP ({deep['layers']} hidden layers of width {deep['width']}, batch {deep['batch']}, "
               f"{_fmt(deep['params_mib'], 0)} MiB of parameters; target: forward-gradient peak <= 0.5 x "  # type: ignore[arg-type]
               "backprop's), peak memory of two steps and time of one:", "",
               "| step | peak MiB | × backprop | RSS MiB | × backprop | × forward (no grad) | step ms |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for label in [DEEP_FORWARD, *(v.label for v in DEEP_VARIANTS), DEEP_ZO_PASSES]:
            r = deep[label]  # type: ignore[index]
            md.append(f"| {label} | {_fmt(r['peak_mib'], 1)} | {_fmt(r['over_bp'])} | {_fmt(r['rss_mib'], 1)} | "
                      f"{_fmt(r['rss_over_bp'])} | {_fmt(r['over_forward'])} | {_fmt(r['step_ms'], 0)} |")
        fg = deep[DEEP_VARIANTS[1].label]  # type: ignore[index]
        md += ["", f"- default forward gradient (dense normal, k=1): {fg['over_bp']:.2f} x backprop's peak "
               f"({'met' if fg['over_bp'] <= 0.5 else 'NOT met'})"]
        md += zo_memory_lines(deep) + [""]
    if quality:
        md += [f"Estimate quality on the MLP (batch 64, random data, {args.quality_draws} estimates each, mean "
               "aggregation): cosine similarity to the backprop gradient, and E|g - a|^2 / |a|^2 measured "
               "and predicted (fwdgrad.experiments.quality.structured).", "",
               "| tangents | k | cosine (mean ± sd) | E‖g−a‖²/‖a‖² measured | predicted |", "|---|---:|---:|---:|---:|"]
        md += [f"| {q['distribution']} | {q['k']} | {q['cosine_mean']:.2e} ± {q['cosine_sd']:.1e} | "
               f"{q['rel_err_measured']:.4g} | {q['rel_err_predicted']:.4g} |" for q in quality]
        md += [""]
    md += [f"Training loop overhead: {loop['note']}", ""]
    (out / "bench.md").write_text("\n".join(md))


# -- main --------------------------------------------------------------------------------------------------
def _ints(text: str, what: str, zero_ok: bool = False) -> List[int]:
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
    p.add_argument("--ks", default="1,4,16", help="numbers of tangents")
    p.add_argument("--distributions", default="normal,rademacher,rank1")
    p.add_argument("--func-ks", default="1,16",
                   help="k values also run on the torch.func reference path (normal tangents); the conv net "
                        "gets only k=1 there unless --func-convnet")
    p.add_argument("--func-convnet", action="store_true", help="run every --func-ks on the conv net too")
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
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc's default malloc thresholds (see fwdgrad.perf.memory.tune_malloc)")
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
        args.zo_ks, args.simulated_ks = "1,2", "2"
        args.repeats, args.min_sample_ms, args.quality_draws = 2, 1.0, min(args.quality_draws, 3)
    if args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}.")
    return args


def run(args: argparse.Namespace) -> Path:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        build_model(m, True)  # validates the name before any long work
    batches, ks, func_ks = _ints(args.batches, "batches"), _ints(args.ks, "ks"), _ints(args.func_ks, "func-ks")
    zo_ks, sim_ks = _ints(args.zo_ks, "zo-ks"), _ints(args.simulated_ks, "simulated-ks")
    frog_batches = _ints(args.frog_batches, "frog-batches")
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
    if args.clock == "thread" and any(t != 1 for t in _ints(args.target_threads, "target-threads", zero_ok=True)):
        raise BenchError(f"--clock thread needs one thread, but --target-threads {args.target_threads!r} asks "
                         "for other counts: pass --target-threads 1 (or '') with --clock thread.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but CUDA is not available; use --device cpu.")
    out = Path(args.out) if args.out else ROOT / "outputs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"output directory {out} is not empty; pass a new --out (results are never overwritten).")
    info = machine_info(device)
    info["malloc_tuned"] = False if args.no_malloc_tuning else tune_malloc()
    info["clock"] = args.clock
    mem = PeakMemory(device)
    rng = random.Random(0)
    log.info("machine: %s", info)
    results: List[Result] = []
    t0 = time.perf_counter()
    for m in models:
        fks = func_ks if (m == "mlp" or args.func_convnet) else [k for k in func_ks if k == 1]
        extra = (zo_ks, sim_ks) if m == "mlp" else ((), ())  # zeroth-order and simulated rows: the MLP only
        vs = frog_variants(ks, func_ks) if m in FROG_MODELS else variants(ks, dists, fks, *extra)
        for b in (frog_batches if m in FROG_MODELS else batches):
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


if __name__ == "__main__":
    sys.exit(main())
