"""Running a training job: how many processes (decided here, outside the loop), and what one process does.

* :func:`train`: the public entry, ``train(cfg, output_dir) -> metrics``. It runs :func:`train_process` in this
  process, in ``distributed.world_size`` spawned local workers (``torch.distributed``, gloo on CPU), or, under
  ``torchrun``, as one member of torchrun's process group.
* :func:`train_process`: one process's run: check the settings, build, apply the thread count and the malloc
  tuning, :func:`~fwdgrad.experiments.training.loop.fit`, and write ``plots.png`` and ``metrics.json``.
* :func:`run`: what ``mnist_fwdgrad.py`` / ``mnist_backprop.py`` call: :func:`train`, with a run that ended early
  reported after its files are written: a non-finite loss or a lost data-parallel worker as a
  :class:`~fwdgrad.errors.RunError` (exit status 1), a stop signal as :class:`~fwdgrad.errors.Interrupted`
  (exit status 128 + the signal's number).

Before anything is loaded, :func:`train` checks the config against its schema
(:class:`fwdgrad.app.schema.TrainingConfig`), the scalar settings, and that the run directory holds no earlier run
(:func:`fwdgrad.app.rundir.claim_run_dir`). SIGINT/SIGTERM stop the run at a step boundary
(:mod:`fwdgrad.experiments.training.signals`); ``run.json`` says from the start that a run is under way, so that one killed
outright (SIGKILL) is still found, as unfinished, by ``compare.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing.spawn import ProcessException

from fwdgrad import errors
from fwdgrad.app.config import threads
from fwdgrad.experiments.training.launch import configure_logging, env_world_size, init_from_env, launch_workers, logging_spec
from fwdgrad.errors import ConfigError, Interrupted, RunError, WorkerLostError
from fwdgrad.perf.memory import RssPeak, tune_malloc
from fwdgrad.app.rundir import claim_output_dir
from fwdgrad.app.schema import TrainingConfig, validate_config
from fwdgrad.experiments.training.factory import Components, Settings, build_components, read_settings
from fwdgrad.experiments.training.loop import TrainState, evaluate, finite_or_none, fit
from fwdgrad.experiments.training.recorder import Recorder
from fwdgrad.experiments.training.resume import Resume, history_rows, load_resume, restore, resume_config
from fwdgrad.experiments.training.run_files import METRICS_FILE, PLOTS_FILE, StopReason
from fwdgrad.experiments.training.signals import StopSignals

__all__ = ["run", "train", "train_process"]

log = logging.getLogger(__name__)


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("no output directory: pass output_dir=... or run through mnist_fwdgrad.py / "
                          "mnist_backprop.py (Hydra sets the run directory).")
    return Path(HydraConfig.get().runtime.output_dir)


def _script_name() -> str:
    from hydra.core.hydra_config import HydraConfig

    return f"{HydraConfig.get().job.name}.py" if HydraConfig.initialized() else "train()"


def _command_line_overrides() -> Optional[List[str]]:
    """The task overrides of the current Hydra job (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def train(cfg: DictConfig, output_dir: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` with the estimator ``cfg.gradient``; return the metrics.

    Args:
        cfg: the composed config (``configs/mnist_fwdgrad.yaml`` or ``configs/mnist_backprop.yaml``).
        output_dir: where to write; defaults to Hydra's run directory, so tests and notebooks can call
            ``train(cfg, tmp_path)`` without ``@hydra.main``. It must be new or empty (or ``cfg.overwrite``
            true, which deletes an earlier run's files there first).

    ``cfg.resume`` (a run directory) continues that run from its last checkpoint, with its config
    (:mod:`fwdgrad.experiments.training.resume`; from the Python API, pass that run's config with ``resume`` set).

    Returns:
        The dict also written to ``metrics.json`` (keys :data:`~fwdgrad.experiments.training.run_files.METRIC_KEYS`). A
        run that ends early (a non-finite loss, a stop signal, a lost data-parallel worker) does not raise: it
        ends with ``stopped`` saying why, after writing everything (:func:`run` turns it into an error).

    Raises:
        UserError: a bad config or run directory, before anything is written.
    """
    validate_config(cfg, TrainingConfig, _script_name())
    output_dir = Path(output_dir) if output_dir is not None else _hydra_output_dir()
    keep = Path(str(cfg.resume)) if cfg.get("resume") else None  # never written into, never deleted
    if keep is not None:  # the earlier run's config, with only how/where it runs taken from this one
        cfg = resume_config(cfg, load_resume(cfg.resume), _command_line_overrides())
    dist_cfg = cfg.get("distributed") or {}
    world_size = int(dist_cfg.get("world_size", 1))
    timeout_s = float(dist_cfg.get("timeout_s", 120))
    if world_size < 1:
        raise ConfigError(f"distributed.world_size must be >= 1, got {world_size}.")
    read_settings(cfg)  # a bad value fails here, before any data is loaded or worker spawned
    if torch.distributed.is_initialized():  # already a worker (spawned below, or a caller's process group)
        return train_process(cfg, output_dir)
    if env_world_size() > 1:  # started by torchrun: every process runs this function
        if int(os.environ.get("RANK", "0")) == 0:
            claim_output_dir(output_dir, bool(cfg.get("overwrite", False)), keep)
        init_from_env(str(dist_cfg.get("backend", "auto")), timeout_s)
        return train_process(cfg, output_dir)
    claim_output_dir(output_dir, bool(cfg.get("overwrite", False)), keep)
    if world_size > 1:
        return _train_spawned(cfg, output_dir, world_size, timeout_s)
    return train_process(cfg, output_dir)


def run(cfg: DictConfig) -> Dict[str, Any]:
    """The training scripts' task: :func:`train` into Hydra's run directory; a run that ended early is an error
    (after its files are written): a non-finite loss or a lost worker a RunError, a stop signal Interrupted."""
    metrics = train(cfg)
    reason = StopReason(metrics["stopped"])
    if reason.ended_early:
        message = f"{metrics['stop_detail']} Run directory: {_hydra_output_dir()}"
        if reason is StopReason.INTERRUPTED:
            raise Interrupted(message, getattr(signal, metrics.get("stop_signal") or "SIGTERM", signal.SIGTERM))
        raise RunError(message)
    return metrics


# -- data parallelism: local workers ----------------------------------------------------------------------------
def _worker(rank: int, world_size: int, cfg_yaml: str, output_dir: str, log_spec: List[Dict[str, Any]]) -> None:
    configure_logging(log_spec, rank)
    train_process(OmegaConf.create(cfg_yaml), Path(output_dir))


def _train_spawned(cfg: DictConfig, output_dir: Path, world_size: int, timeout_s: float) -> Dict[str, Any]:
    """Run :func:`train_process` in ``world_size`` local processes; return rank 0's metrics.

    A stop signal to this process is forwarded to the workers, which stop together at the end of a logging window;
    a second one ends them at once.
    """
    log.info("data-parallel training on %d local processes (each on 1/%d of every batch); rank 0 writes %s",
             world_size, world_size, output_dir)
    with StopSignals(escalate=True) as signals:
        forwarded = [0]

        def forward_signals(pids: List[int]) -> None:
            if signals.count > forwarded[0] and signals.received is not None:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signals.received)
                forwarded[0] = signals.count

        try:
            launch_workers(_worker, world_size, timeout_s=timeout_s, poll=forward_signals,
                           args=(OmegaConf.to_yaml(cfg, resolve=True), str(output_dir), logging_spec()))
        except ProcessException as err:  # a worker raised
            raise _worker_error(err) from None
        except WorkerLostError as err:  # a worker was killed, exited with an error status, or hung
            raise _lost_worker_error(err, output_dir, signals) from None
    metrics_file = output_dir / METRICS_FILE
    if not metrics_file.is_file():
        raise RunError(f"the data-parallel workers finished without writing {metrics_file}; see the log above.")
    metrics = json.loads(metrics_file.read_text())
    if metrics.get("stopped") == StopReason.INTERRUPTED.value and signals.received is not None:
        metrics["stop_signal"] = signals.name  # what this process was sent (the workers got it forwarded)
    return metrics


def _lost_worker_error(err: WorkerLostError, output_dir: Path, signals: StopSignals) -> errors.RunError:
    """The launcher's message, with what rank 0 kept (or Interrupted, when a second signal ended the workers)."""
    metrics_file = output_dir / METRICS_FILE
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        kept = f"Rank 0 wrote {metrics_file} (stopped={metrics.get('stopped')}): {metrics.get('stop_detail')}"
    else:
        kept = (f"Rank 0 did not write {METRICS_FILE}: {output_dir} keeps history.csv and model.pt as of the last "
                "finished epoch, and compare.py lists the run as unfinished.")
    if signals.count > 1:
        return Interrupted(f"stopped at once by a second {signals.name}: {err} {kept}", signals.received or 15)
    return WorkerLostError(f"{err} {kept}")


def _worker_error(err: Exception) -> errors.FwdgradError:
    """The error a worker raised, rebuilt from the last line of its traceback (``module.Class: message``) when
    it is one of fwdgrad's, so that a config error in a worker still exits with status 2; else a RunError, with
    the worker's traceback logged (it is a bug)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    name, _, message = last.partition(": ")
    cls = getattr(errors, name.rsplit(".", 1)[-1], None)
    if isinstance(cls, type) and issubclass(cls, errors.FwdgradError) and cls is not Interrupted and message:
        return cls(message)
    log.error("a data-parallel worker failed:\n%s", str(err).strip())
    return RunError(f"a data-parallel worker failed ({last}); its traceback is in the log above.")


# -- one process ---------------------------------------------------------------------------------------------------
def _rank_and_world() -> Tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _malloc_tuning(setting: Any, parts: Components, device: torch.device) -> Iterator[None]:
    """Apply :func:`fwdgrad.perf.memory.tune_malloc` for the run when it helps, restoring glibc's defaults after.

    ``auto`` tunes for k > 1 forward gradients on the CPU: each intermediate tangent is k activations large, and
    glibc would hand every such block back to the OS and page-fault it in again on the next step.
    """
    k = int(parts.estimator.describe().get("num_tangents", 1))
    wanted = setting is True or (setting == "auto" and k > 1 and device.type == "cpu")
    tuned = tune_malloc(True) if wanted else False
    if wanted:
        log.info("malloc %s (tune_malloc=%s; k=%d on %s)", "tuned to keep freed memory for reuse" if tuned
                 else "tuning unavailable (not glibc)", setting, k, device.type)
    try:
        yield
    finally:
        if tuned:
            tune_malloc(False)


class _PeakMemory:
    """Peak memory of the run from its start: CUDA's allocator statistics, or the resident set's growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rss: Optional[RssPeak] = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self._rss = RssPeak().start()

    def read(self) -> Tuple[Optional[float], str]:
        if self._rss is None:
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_memory_allocated"
        return self._rss.peak_mib(), self._rss.source


def train_process(cfg: DictConfig, output_dir: Path) -> Dict[str, Any]:
    """This process's share of the run (the whole run in a single process); returns the metrics."""
    settings = read_settings(cfg)
    rank, world_size = _rank_and_world()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one log: rank 0's
    # A worker of a data-parallel run never escalates a second signal (module docstring of signals.py).
    with threads(settings.threads) as n_threads, StopSignals(escalate=world_size == 1) as signals:
        log.info("torch uses %d intra-op threads (threads=%s)", n_threads, settings.threads)
        parts = build_components(cfg, settings, world_size)
        resume = load_resume(cfg.resume) if cfg.get("resume") else None
        if resume is not None:
            restore(parts, resume)
        with _malloc_tuning(settings.tune_malloc, parts, settings.device):
            state, metrics = _recorded_fit(cfg, output_dir, parts, settings, rank == 0, signals, resume)
    log.info("done (%s: %s): final test accuracy %.4f, best %.4f, %d steps, %.1f s; outputs in %s", state.stop.value,
             state.stop_detail, state.test_accuracy, state.best_test_accuracy, state.step, metrics["wall_time_s"],
             output_dir)
    return metrics


def _recorded_fit(cfg: DictConfig, output_dir: Path, parts: Components, settings: Settings, writes: bool,
                  signals: StopSignals, resume: Optional[Resume]) -> Tuple[TrainState, Dict[str, Any]]:
    """:func:`fit` with its files: ``run.json`` first (the run is under way), then the history, checkpoints and
    ``metrics.json`` as it goes, ``plots.png``, and ``run.json`` again with how it ended (``failed`` and the error
    if it raised)."""
    recorder = Recorder(output_dir, enabled=writes)
    memory = _PeakMemory(settings.device)
    recorder.write_status("running", world_size=parts.world_size,
                          resumed_from=str(resume.run_dir) if resume is not None else None)
    if resume is not None:
        recorder.preload(history_rows(resume))
    try:
        state = _fit_with_progress(parts, settings, recorder, cfg, signals, resume)
        metrics = _metrics(state, parts, settings, memory, signals)
        metrics["resumed_from"] = str(resume.run_dir) if resume is not None else None
        recorder.flush()
        recorder.write_metrics(metrics)  # before the figure: a figure that fails to draw must not cost the numbers
        if writes:
            _plot(recorder, parts, state, settings, output_dir)
        recorder.write_status(state.stop.value, state.stop_detail)
    except BaseException as err:
        recorder.write_status("failed", f"{type(err).__name__}: {' '.join(str(err).split())}")
        raise
    finally:
        recorder.close()
    return state, metrics


def _fit_with_progress(parts: Components, settings: Settings, recorder: Recorder, cfg: DictConfig,
                       signals: StopSignals, resume: Optional[Resume]) -> TrainState:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    show = settings.progress_bar and recorder.enabled
    with logging_redirect_tqdm(), tqdm(total=parts.total_steps, disable=not show, unit="step", dynamic_ncols=True,
                                       initial=resume.step if resume is not None else 0) as bar:
        return fit(parts, settings, recorder, cfg, bar, signals, resume)


def _plot(recorder: Recorder, parts: Components, state: TrainState, settings: Settings, output_dir: Path) -> None:
    from fwdgrad.experiments.plots import plot_run  # matplotlib only when a figure is drawn

    plot_run(recorder.rows, output_dir / PLOTS_FILE, parts.splits, state.predictions, settings.plot_misclassified)


def _metrics(state: TrainState, parts: Components, settings: Settings, memory: _PeakMemory,
             signals: StopSignals) -> Dict[str, Any]:
    """``metrics.json``: the run's results and what it ran with."""
    peak_mb, peak_source = memory.read()
    data_parallel = parts.world_size > 1
    # the training set's accuracy at the end, as the held-out one (eval mode, every example): the train error
    # of a results table (the logged train/accuracy is a running mean over batches while the weights move)
    _, train_accuracy, _ = evaluate(parts.model, parts.splits.train_x, parts.splits.train_y,
                                    settings.eval_batch_size)
    return {
        "final_test_accuracy": state.test_accuracy,
        "best_test_accuracy": state.best_test_accuracy,
        "final_test_loss": finite_or_none(state.test_loss),
        "final_train_loss": finite_or_none(state.final_train_loss),
        "final_train_accuracy": train_accuracy,
        "steps": state.step,
        "epochs_completed": state.epochs_completed,
        "wall_time_s": round(state.elapsed(), 3),
        "step_time_ms": statistics.median(state.step_ms) if state.step_ms else None,
        "peak_memory_mb": round(peak_mb, 1) if peak_mb is not None else None,
        "peak_memory_source": peak_source,
        "stopped": state.stop.value,
        "stop_detail": state.stop_detail,
        "stop_signal": signals.name if state.stop is StopReason.INTERRUPTED and signals.received else None,
        "estimator": parts.estimator.describe(),
        "dataset": parts.splits.name,
        "model": type(parts.model).__name__,
        "device": str(settings.device),
        "model_parameters": sum(p.numel() for p in parts.params),
        "dataset_info": parts.splits.describe(),
        "data_load_s": round(parts.data_load_s, 3),
        "seed": settings.seed,
        "world_size": parts.world_size,
        "threads": torch.get_num_threads(),
        # bytes this rank contributed to all-reduces in the last step (k+1 float64 for forward gradients,
        # n+1 floats for backprop); 0 in a single process.
        "allreduce_bytes_per_step": parts.estimator.stats.bytes_allreduced if data_parallel else 0,
    }
