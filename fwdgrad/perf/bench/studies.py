"""The benchmark's side studies: deep-MLP memory, estimator quality beside speed, the training loop's overhead."""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from typing import Dict, List, Sequence

import torch
from hydra.utils import instantiate

from fwdgrad import (
    Backprop,
    ForwardGradient,
    estimate_module_grads,
)
from fwdgrad.experiments.data import PROJECT_ROOT
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.nn.models import MLP
from fwdgrad.perf.bench.timing import PeakMemory
from fwdgrad.perf.bench.workloads import (
    DEEP_FORWARD,
    DEEP_VARIANTS,
    DEEP_ZO_PASSES,
    MIB,
    Variant,
    build_model,
    make_step,
    zo_passes_step,
)

log = logging.getLogger("bench")


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

    # the checkout's configs/ (the benchmark runs from a checkout, like every experiment), and the real digits
    # from the shared/ folder beside it when present
    shared = PROJECT_ROOT.parent / "shared" / "data" / "mnist"
    batch = 32 if args.quick else 256
    data = (["dataset=mnist", f"dataset.root={shared}", "dataset.test_set_split=2000"]
            if (shared / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file() else ["dataset=digits"])
    overrides = [*data, f"dataset.batch_size={batch}", f"optimization.max_steps={steps}", "log_every=20",
                 "progress_bar=false", "plot_misclassified=0", "device=cpu"]
    if args.quick:
        overrides.append("model.hidden_sizes=[64,64]")
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base="1.3"):
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
