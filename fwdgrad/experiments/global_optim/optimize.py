"""Global optimisation of test functions: a gradient estimator beside a baseline, from the same start.

This is the first experiment of Baydin et al. (2022, *Gradients without Backpropagation*, Sec. 5.1): minimise
Beale and Rosenbrock with forward gradients and with backprop, with the same optimizer, learning rate and
number of iterations, and compare the trajectories. The n-dimensional functions (Sphere, Rosenbrock,
Styblinski-Tang) follow Fluegel et al. (2024).

Each estimator drives its own ``torch.optim`` optimizer on its own copy of the start point ``x_0``:

    loss_t, g_t = estimator(f, x_t)          # f(x_t) and an estimate of grad f(x_t)
    x_{t+1} = optimizer_step(x_t, g_t)

For the forward gradient ``E[g_t] = grad f(x_t)``; for backprop ``g_t = grad f(x_t)`` exactly.

:func:`run_global_optim` takes the composed Hydra config (``configs/global_optim.yaml``) and writes, into the
run directory, TensorBoard scalars per estimator, ``summary.json``, ``loss.png`` and (2-D only)
``trajectories.png``, and the training runs' contract (:mod:`fwdgrad.experiments.training.run_files`: ``metrics.json``,
``history.csv``) for the estimator under test, so that ``compare.py`` tabulates a sweep of these runs too. It
returns the summary.

``early_stopping_patience: N`` stops a run after N consecutive steps without a decrease of ``f`` (frog's rule for
its closed-form functions, N = 50).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fwdgrad.app.config import build, build_optimizer, build_scheduler, check_learning_rate, threads
from fwdgrad.errors import ConfigError, RunError
from fwdgrad.estimators import GradientEstimator, check_seed
from fwdgrad.app.rundir import claim_output_dir
from fwdgrad.app.schema import GlobalOptimConfig, validate_config
from fwdgrad.experiments.global_optim.functions import TestFunction
from fwdgrad.experiments.training.run_files import HISTORY_COLUMNS, HISTORY_FILE, METRICS_FILE, StopReason

__all__ = ["ConfigError", "OptimResult", "estimator_label", "optimise", "run", "run_global_optim"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[List[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class OptimResult:
    """What one estimator did: its values ``f(x_0), ..., f(x_T)``, path (2-D) and final state."""

    label: str
    role: str
    settings: Dict[str, Any]
    values: List[float] = field(default_factory=list)
    path: Optional[np.ndarray] = None
    final_point: List[float] = field(default_factory=list)
    final_value: Optional[float] = None
    distance_to_minimum: Optional[float] = None
    iterations_run: int = 0
    wall_time_s: float = 0.0
    diverged: bool = False
    message: Optional[str] = None
    early_stopped: bool = False  #: stopped by ``early_stopping_patience`` (not part of :meth:`summary`)
    times: List[float] = field(default_factory=list)  #: seconds from the start to each value in ``values``

    @property
    def stop(self) -> StopReason:
        """Why the run ended, in the training runs' vocabulary."""
        if self.diverged:
            return StopReason.NON_FINITE_LOSS
        return StopReason.EARLY_STOPPING if self.early_stopped else StopReason.COMPLETED

    def summary(self) -> Dict[str, Any]:
        """The JSON-ready record of this run (no per-step arrays)."""
        return {
            "role": self.role,
            "settings": self.settings,
            "final_point": self.final_point,
            "final_value": self.final_value,
            "distance_to_minimum": self.distance_to_minimum,
            "iterations_run": self.iterations_run,
            "wall_time_s": self.wall_time_s,
            "diverged": self.diverged,
            "message": self.message,
            "tensorboard_dir": f"tb/{self.label}",
        }


def estimator_label(estimator: GradientEstimator) -> str:
    """A readable, filesystem-safe name from ``estimator.describe()``: ``forward_gradient_k1_mean_normal``.

    The seed is left out (runs with different seeds live in different run directories); ``num_tangents``
    is written ``k<value>``.
    """
    info = dict(estimator.describe())
    name = str(info.pop("estimator", type(estimator).__name__))
    info.pop("seed", None)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    parts = [snake] + [f"k{v}" if key == "num_tangents" else str(v) for key, v in info.items()]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", "_".join(parts))


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def optimise(
    function: TestFunction,
    estimator: GradientEstimator,
    start: Tensor,
    make_optimizer: OptimizerFactory,
    iterations: int,
    make_scheduler: Optional[SchedulerFactory] = None,
    writer: Optional[SummaryWriter] = None,
    log_every: int = 10,
    record_path: bool = False,
    label: str = "",
    role: str = "",
    progress: bool = False,
    patience: Optional[int] = None,
) -> OptimResult:
    """Run ``iterations`` optimizer steps on ``function`` from ``start`` with gradients from ``estimator``.

    A non-finite ``f(x_t)`` stops the run: the result is marked ``diverged`` with a message, and its final
    point/value are the last iterate whose value was finite; what was logged so far stays logged. With
    ``patience`` N, N consecutive steps with ``f(x_{t+1}) >= f(x_t)`` stop it early (``early_stopped``).

    Args:
        function: the objective, ``f(x)`` for ``x`` of shape ``(dim,)``.
        estimator: any :class:`GradientEstimator`; called as ``loss, grad = estimator(function, x)``.
        start: the start point (copied, never modified).
        make_optimizer: ``params -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.Adam, lr=...)``).
        iterations: number of optimizer steps T.
        make_scheduler: optional ``optimizer -> LR scheduler``, stepped after every optimizer step.
        writer: TensorBoard writer for ``loss`` and ``distance_to_minimum`` (every ``log_every`` steps and at
            the end), or ``None``.
        log_every: logging period in steps.
        record_path: keep every iterate (for 2-D trajectory plots).
        label, role: names carried into the result and the progress bar.
        progress: show a tqdm bar (only when stderr is a terminal).
        patience: early stopping after this many steps without a decrease of f (None: never).
    """
    trace = _Trace(function, start, iterations, writer, log_every, record_path)
    optimizer = make_optimizer([trace.x])
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    bar = tqdm(range(iterations), desc=label, disable=None if progress else True, leave=False, mininterval=0.5)
    t0 = time.perf_counter()
    steps, bad = _descend(trace, estimator, optimizer, scheduler, bar, patience)
    if bad is None:  # no non-finite value: f(x_steps) is the value the summary reports
        bad = trace.finish(steps)
    wall = time.perf_counter() - t0
    bar.close()
    message = None if bad is None else _divergence_message(label, start, iterations, optimizer, *bad)
    if message is not None:
        log.warning("%s", message)
    return trace.result(label, role, dict(estimator.describe()), steps, wall, message,
                        early_stopped=bad is None and steps < iterations)


class _Trace:
    """The iterate ``x`` of one run and what is kept of its path: values, the last finite iterate, the points
    (2-D plots), and the TensorBoard scalars."""

    def __init__(self, function: TestFunction, start: Tensor, iterations: int, writer: Optional[SummaryWriter],
                 log_every: int, record_path: bool) -> None:
        self.function, self.iterations, self.writer, self.log_every = function, iterations, writer, log_every
        self.x = start.detach().clone()
        self.last_finite = self.x.clone()
        self.minima = function.minima_tensor(self.x.dtype)
        self.path = torch.empty(iterations + 1, self.x.numel(), dtype=self.x.dtype) if record_path else None
        self.values: List[float] = []
        self.times: List[float] = []
        self._t0 = time.perf_counter()

    def distance(self, point: Tensor) -> float:
        return float(torch.linalg.vector_norm(point - self.minima, dim=1).min())

    def record(self, t: int, value: float, log_scalars: bool) -> None:
        """Keep the finite value ``f(x_t)`` of the current iterate (and log it to TensorBoard if asked)."""
        self.values.append(value)
        self.times.append(time.perf_counter() - self._t0)
        self.last_finite.copy_(self.x)
        if self.path is not None:
            self.path[t] = self.x
        if log_scalars and self.writer is not None:
            self.writer.add_scalar("loss", value, t)
            self.writer.add_scalar("distance_to_minimum", self.distance(self.x), t)

    def result(self, label: str, role: str, settings: Dict[str, Any], steps: int, wall: float,
               message: Optional[str], early_stopped: bool) -> OptimResult:
        """The run's :class:`OptimResult`: what was recorded, ending at the last finite iterate."""
        return OptimResult(
            label=label, role=role, settings=settings, values=self.values,
            path=self.path[: len(self.values)].numpy() if self.path is not None else None,
            final_point=[float(v) for v in self.last_finite.tolist()],
            final_value=self.values[-1] if self.values else None,
            distance_to_minimum=_finite_or_none(self.distance(self.last_finite)),
            iterations_run=steps, wall_time_s=wall, diverged=message is not None, message=message,
            early_stopped=early_stopped, times=self.times,
        )

    def finish(self, t: int) -> Optional[Tuple[int, float]]:
        """Evaluate and record ``f(x_t)`` of the last iterate; ``(t, value)`` if it is not finite."""
        with torch.no_grad():
            value = float(self.function(self.x))
        if not math.isfinite(value):
            return t, value
        self.record(t, value, log_scalars=True)
        return None


def _descend(trace: _Trace, estimator: GradientEstimator, optimizer: torch.optim.Optimizer, scheduler: Any,
             steps: Iterable[int], patience: Optional[int] = None) -> Tuple[int, Optional[Tuple[int, float]]]:
    """The optimizer steps; returns how many were taken and ``(t, f(x_t))`` of a non-finite value, if one
    stopped them. With ``patience``, ``patience`` consecutive values ``f(x_t) >= f(x_{t-1})`` end the steps."""
    taken, stalled = 0, 0
    for t in steps:
        loss, grad = estimator(trace.function, trace.x)
        value = float(loss)
        if not math.isfinite(value):
            return taken, (t, value)
        stalled = stalled + 1 if trace.values and value >= trace.values[-1] else 0
        if patience is not None and stalled >= patience:
            return taken, None  # x_t is the last iterate: finish() records f(x_t)
        trace.record(t, value, log_scalars=t % trace.log_every == 0)
        trace.x.grad = grad
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        taken = t + 1
    return taken, None


def _divergence_message(label: str, start: Tensor, iterations: int, optimizer: torch.optim.Optimizer, t: int,
                        value: float) -> str:
    if t == 0:
        return (f"{label}: f(x) = {value} at the start point {start.tolist()}; nothing to optimise. "
                "Choose a start where f is finite (function.start=[...]).")
    return (
        f"{label} diverged: f(x) = {value} at iteration {t}; stopped after {t} of {iterations} steps. "
        f"The summary keeps the last finite iterate (iteration {t - 1}). Lower optimization.learning_rate (the "
        f"last step used lr {optimizer.param_groups[0]['lr']:.3g}); for a forward gradient, more tangents "
        "(gradient.num_tangents) also reduce the variance of its steps."
    )


# -- config handling ---------------------------------------------------------------------------------------
def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"`{key}` must be an integer >= 1, got {value!r}; e.g. {key}=1000.")
    return value


def _check_config(cfg: DictConfig) -> Tuple[int, int, Optional[int]]:
    missing = [k for k in ("function", "gradient", "optimization", "iterations") if k not in cfg]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(missing)}; compose configs/global_optim.yaml.")
    validate_config(cfg, GlobalOptimConfig, "global_optim.py")
    iterations = _positive_int(cfg, "iterations")
    log_every = _positive_int(cfg, "log_every") if "log_every" in cfg else 10
    check_learning_rate(cfg.optimization.get("learning_rate"))
    check_seed(cfg.get("seed", 0))
    patience = _positive_int(cfg, "early_stopping_patience") if cfg.get("early_stopping_patience") is not None \
        else None
    return iterations, log_every, patience


def _factories(cfg: DictConfig, start: Tensor, iterations: int) -> Tuple[OptimizerFactory, SchedulerFactory]:
    """The optimizer and scheduler of ``cfg.optimization`` as factories, tried once on a scratch copy of the
    start so that a bad value fails before any work."""
    optimizer_node, scheduler_node = cfg.optimization.optimizer, cfg.optimization.get("scheduler")

    def make_optimizer(params: List[Tensor]) -> torch.optim.Optimizer:
        return build_optimizer(optimizer_node, params)

    def make_scheduler(optimizer: torch.optim.Optimizer) -> Any:
        return build_scheduler(scheduler_node, optimizer, iterations)

    make_scheduler(make_optimizer([start.clone()]))
    return make_optimizer, make_scheduler


def _unique(labels: Sequence[str], roles: Sequence[str]) -> List[str]:
    """Append the role to labels that would otherwise share a TensorBoard directory."""
    return [f"{lab}_{role}" if labels.count(lab) > 1 else lab for lab, role in zip(labels, roles)]


def _output_dir(output_dir: Union[str, Path, None], overwrite: bool) -> Path:
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ConfigError("no output directory: pass output_dir=... or run through global_optim.py "
                              "(Hydra sets its run directory).")
        output_dir = HydraConfig.get().runtime.output_dir
    out = Path(output_dir)
    claim_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _preflight(cfg: DictConfig, roles: Sequence[str], function: TestFunction, start: Tensor) -> None:
    """One step of each estimator, built afresh from its config, at a copy of the start, before anything is
    written: what only a call can find out (projection with more tangents than dimensions, a distribution that
    does not fit the parameters, an op the fast engine lacks with backend=fast) fails here as a ConfigError.
    The estimators that run are untouched, so their random streams start where they should."""
    for role in roles:
        build(cfg[role], role, expected=GradientEstimator)(function, start.clone())


def _table(function: TestFunction, results: Sequence[OptimResult]) -> str:
    width = max(len("estimator"), *(len(r.label) for r in results))
    head = f"{'estimator':<{width}}  {'final f(x)':>12}  {'distance':>10}  {'steps':>7}  {'time [s]':>8}  status"
    lines = [f"{type(function).__name__} (dim {function.dim}), minimum f* = {function.min_value:.6g}", head]
    for r in results:
        fv = f"{r.final_value:.4e}" if r.final_value is not None else "n/a"
        dist = f"{r.distance_to_minimum:.3e}" if r.distance_to_minimum is not None else "n/a"
        status = (f"DIVERGED after {r.iterations_run} steps" if r.diverged else
                  f"early stop after {r.iterations_run} steps" if r.early_stopped else "ok")
        lines.append(f"{r.label:<{width}}  {fv:>12}  {dist:>10}  {r.iterations_run:>7}  "
                     f"{r.wall_time_s:>8.2f}  {status}")
    return "\n".join(lines)


def run_metrics(function: TestFunction, results: Sequence[OptimResult], seed: Any = None) -> Dict[str, Any]:
    """``metrics.json`` of a global-optimisation run: the estimator under test (``results[0]``), and the final
    values of the others (the baseline) under ``others``."""
    r, f_star = results[0], function.min_value
    values = [v for v in r.values if math.isfinite(v)]
    best = min(values) if values else None
    return {
        "final_value": r.final_value,
        "best_value": best,
        "min_value": f_star,
        "final_gap": None if r.final_value is None else r.final_value - f_star,
        "best_gap": None if best is None else best - f_star,
        "distance_to_minimum": r.distance_to_minimum,
        "steps": r.iterations_run,
        "wall_time_s": round(r.wall_time_s, 3),
        "step_time_ms": 1e3 * r.wall_time_s / r.iterations_run if r.iterations_run else None,
        "stopped": r.stop.value,
        "stop_detail": r.message,
        "estimator": r.settings,
        "function": type(function).__name__,
        "dim": function.dim,
        "seed": seed,
        "others": {o.label: {"final_value": o.final_value, "stopped": o.stop.value} for o in results[1:]},
    }


def write_run_files(out: Path, function: TestFunction, results: Sequence[OptimResult], log_every: int,
                    seed: Any = None) -> None:
    """The training runs' contract (:mod:`fwdgrad.experiments.training.run_files`) for the estimator under test:
    ``history.csv`` (every ``log_every`` steps and the last; its ``train/loss`` is the gap ``f(x_t) - f*``), then
    ``metrics.json`` (last: it marks a finished run)."""
    r, f_star = results[0], function.min_value
    last = len(r.values) - 1
    rows = [",".join(HISTORY_COLUMNS)]
    for t, (value, seconds) in enumerate(zip(r.values, r.times)):
        if t % log_every == 0 or t == last:
            cells = {"step": str(t), "wall_time_s": f"{seconds:.6g}", "train/loss": repr(value - f_star)}
            rows.append(",".join(cells.get(c, "") for c in HISTORY_COLUMNS))
    (out / HISTORY_FILE).write_text("\n".join(rows) + "\n")
    (out / METRICS_FILE).write_text(json.dumps(run_metrics(function, results, seed), indent=2, allow_nan=False)
                                    + "\n")


def run(cfg: DictConfig) -> Dict[str, Any]:
    """``global_optim.py``'s task: :func:`run_global_optim` into Hydra's run directory; an estimator that
    diverged (a non-finite f) makes it a :class:`~fwdgrad.errors.RunError` (exit status 1), after every file is
    written, as a non-finite training loss does in the MNIST scripts."""
    summary = run_global_optim(cfg)
    diverged = [label for label, r in summary["estimators"].items() if r["diverged"]]
    if diverged:
        raise RunError(
            f"{', '.join(diverged)} diverged (f(x) became non-finite; see the warnings above). summary.json and "
            "the figures keep every estimator's run up to its last finite iterate. Lower "
            "optimization.learning_rate, or use more tangents (gradient.num_tangents) or optimization=adam_beta95."
        )
    return summary


def run_global_optim(cfg: DictConfig, output_dir: Union[str, Path, None] = None) -> Dict[str, Any]:
    """Run the estimator (``cfg.gradient``) and the baseline (``cfg.baseline``) on ``cfg.function``.

    Both start from ``function.start_point()`` in float64, with a fresh optimizer (and scheduler) each, for
    ``cfg.iterations`` steps. Writes into ``output_dir`` (default: Hydra's run directory):

    * ``tb/<label>/``: TensorBoard scalars ``loss`` and ``distance_to_minimum`` per estimator;
    * ``summary.json``: the returned summary;
    * ``loss.png``: ``f(x_t) - f*`` against t, log scale;
    * ``trajectories.png`` (2-D functions only): contour of ``log(1 + f - f*)`` with both paths.

    Returns the summary: ``{"function": ..., "config": ..., "estimators": {label: {...}}, "all_diverged": ...}``.
    Raises :class:`ConfigError` (before anything is written) for a config that cannot run.
    """
    iterations, log_every, patience = _check_config(cfg)
    with threads(cfg.get("threads")):
        return _run(cfg, iterations, log_every, patience, output_dir)


def _run(cfg: DictConfig, iterations: int, log_every: int, patience: Optional[int],
         output_dir: Union[str, Path, None]) -> Dict[str, Any]:
    function = build(cfg.function, "function", expected=TestFunction)
    roles = ["gradient"] + (["baseline"] if cfg.get("baseline") is not None else [])
    estimators = [build(cfg[role], role, expected=GradientEstimator) for role in roles]
    start = function.start_point(torch.float64)
    make_optimizer, make_scheduler = _factories(cfg, start, iterations)
    _preflight(cfg, roles, function, start)
    labels = _unique([estimator_label(e) for e in estimators], roles)
    out = _output_dir(output_dir, bool(cfg.get("overwrite", False)))
    record_path = function.dim == 2

    log.info("minimising %s (dim %d) from %s for %d steps; estimators: %s", type(function).__name__,
             function.dim, [round(v, 6) for v in start.tolist()], iterations, ", ".join(labels))
    results: List[OptimResult] = []
    for role, estimator, label in zip(roles, estimators, labels):
        writer = SummaryWriter(log_dir=str(out / "tb" / label))
        try:
            results.append(optimise(
                function, estimator, start, make_optimizer, iterations, make_scheduler=make_scheduler,
                writer=writer, log_every=log_every, record_path=record_path, label=label, role=role,
                progress=bool(cfg.get("progress", False)), patience=patience,
            ))
        finally:
            writer.close()

    summary: Dict[str, Any] = {
        "function": {
            "name": type(function).__name__,
            "dim": function.dim,
            "start": [float(v) for v in start.tolist()],
            "minima": function.minima,
            "min_value": function.min_value,
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "estimators": {r.label: r.summary() for r in results},
        "all_diverged": all(r.diverged for r in results),
    }
    # The summary goes first: a figure that fails to draw must not cost the numbers.
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_run_files(out, function, results, log_every, cfg.get("seed"))
    title = (f"{type(function).__name__}, {iterations} steps, lr {cfg.optimization.get('learning_rate')}, "
             f"seed {cfg.get('seed')}")
    from fwdgrad.experiments.plots import plot_loss_curves, plot_trajectories  # matplotlib only when needed

    plot_loss_curves({r.label: r.values for r in results}, function.min_value, out / "loss.png", title=title)
    if record_path:
        plot_trajectories(function, {r.label: r.path for r in results}, out / "trajectories.png", title=title)
    log.info("results (%s):\n%s", out, _table(function, results))
    return summary
