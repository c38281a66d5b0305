"""The one training loop, over an explicit :class:`TrainState`.

Whatever the estimator (backprop, forward gradient with k tangents, their data-parallel wrapper), a step is

    zero grads -> compute_gradients (the estimator writes p.grad) -> clip -> optimizer.step() -> scheduler.step()

and :func:`fit` runs epochs of such steps. The hot loop never synchronises with the device except once per
logging window (every ``log_every`` steps, and at the end of an epoch): the per-step losses are summed on the
device and read there, which is also where a non-finite loss and ``stop_loss_threshold`` are detected. The test
set is evaluated at the start and after every epoch (or the partial epoch a stop ends), when the checkpoint and
the history are written too. Three stops end a run without that last evaluation and checkpoint
(:attr:`StopReason.ended_early`), so that ``model.pt`` always holds a finished epoch: a non-finite loss, a stop
signal (SIGINT/SIGTERM, honoured after the step it arrived in) and a lost data-parallel peer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fwdgrad.experiments.data import iterate_batches
from fwdgrad.errors import ConfigError, WorkerLostError
from fwdgrad.estimators import GradientEstimator, estimate_module_grads
from fwdgrad.estimators.step_buffers import forward_without_buffer_updates
from fwdgrad.nn.functional import cross_entropy, per_example_cross_entropy
from fwdgrad.experiments.training.factory import Components, Settings
from fwdgrad.experiments.training.recorder import Recorder
from fwdgrad.experiments.training.resume import Resume, checkpoint_extras
from fwdgrad.experiments.training.run_files import StopReason
from fwdgrad.experiments.training.signals import StopSignals

__all__ = ["TrainState", "compute_gradients", "evaluate", "fit"]

log = logging.getLogger(__name__)


def compute_gradients(estimator: GradientEstimator, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Estimate the gradient of the mean cross-entropy on ``(x, y)`` and write it into every ``p.grad``.

    The single place where a step's gradient is computed, whatever the estimator. The loss is given per
    example (estimators that work per example need it; the others take its mean). Returns the detached batch
    loss (still on the device: no synchronisation).
    """
    return estimate_module_grads(estimator, model, lambda logits: per_example_cross_entropy(logits, y), x)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float, Tensor]:
    """Mean cross-entropy, accuracy and the predicted classes on ``(x, y)``, by batched no-grad passes."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    preds: List[Tensor] = []
    for xb, yb in iterate_batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += cross_entropy(logits, yb).double() * yb.shape[0]
        preds.append(logits.argmax(dim=1))
    model.train(was_training)
    pred = torch.cat(preds)
    n = y.shape[0]
    return float(loss_sum) / n, float((pred == y).sum()) / n, pred


def finite_or_none(v: Optional[float]) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


@dataclass
class TrainState:
    """Where a run stands: counters, the open logging window, the last evaluation, and why it stopped."""

    device: torch.device
    t_start: float = field(default_factory=time.perf_counter)
    step: int = 0  #: optimizer steps taken
    epochs_completed: int = 0  #: epochs whose last batch was trained on
    # -- the open logging window: losses summed on the device, read once when it closes
    window_loss: Optional[Tensor] = None
    window_n: int = 0
    window_t0: float = 0.0
    batch_accuracy: Optional[Tensor] = None  #: this window's last batch, measured before its step
    # -- the current epoch (finite windows' losses, read at their close)
    epoch_loss_sum: float = 0.0
    epoch_n: int = 0
    step_ms: List[float] = field(default_factory=list)  #: mean step time of every closed window
    final_train_loss: Optional[float] = None  #: mean training loss of the last epoch that logged
    # -- the last evaluation on the held-out set
    test_loss: Optional[float] = None
    test_accuracy: Optional[float] = None
    best_test_accuracy: Optional[float] = None
    predictions: Optional[Tensor] = None
    checkpoint_step: Optional[int] = None  #: the step model.pt holds (None before the first epoch ended)
    stop: Optional[StopReason] = None
    stop_detail: str = ""

    def open_window(self) -> None:
        self.window_loss = torch.zeros((), device=self.device)
        self.window_n = 0
        self.window_t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


def fit(parts: Components, settings: Settings, recorder: Recorder, cfg: DictConfig, progress: Any,
        signals: Optional[StopSignals] = None, resume: Optional[Resume] = None) -> TrainState:
    """Train until every epoch ran or a stopping rule fired; return the final state (``state.stop`` is set).

    ``progress`` is a tqdm-like bar (``update``, ``set_postfix``); ``cfg`` goes into every checkpoint; a signal
    that ``signals`` received stops the run after the step it interrupted (:mod:`fwdgrad.experiments.training.signals`);
    ``resume`` continues from a checkpoint whose weights and states were loaded into ``parts`` already
    (:mod:`fwdgrad.experiments.training.resume`).
    """
    state = TrainState(device=settings.device)
    data_order = torch.Generator().manual_seed(settings.seed)
    if resume is not None:
        _resume_state(state, parts, resume, data_order)
    # the curves start at the initialisation (or at the checkpoint, whose row this joins)
    _evaluate(state, parts, settings, recorder, epoch=state.step / parts.steps_per_epoch)
    for epoch in range(state.epochs_completed, settings.epochs):
        trained_last_batch = _train_epoch(state, parts, settings, recorder, progress, data_order, signals)
        if state.epoch_n:
            state.final_train_loss = state.epoch_loss_sum / state.epoch_n
        if state.stop is not None and state.stop.ended_early:
            break  # no evaluation or checkpoint of a partial epoch: model.pt stays the last finished epoch's
        if trained_last_batch:
            state.epochs_completed += 1
        _end_epoch(state, parts, settings, recorder, cfg, epoch, data_order)
        if state.stop is not None:
            break
    if state.stop is None:
        state.stop = StopReason.COMPLETED
        state.stop_detail = f"all {settings.epochs} epochs ran ({state.step} steps)"
    return state


def _resume_state(state: TrainState, parts: Components, resume: Resume, data_order: torch.Generator) -> None:
    """Where the resumed run stands: the checkpoint's counters and the data order of its next epoch."""
    if resume.step != resume.epochs_completed * parts.steps_per_epoch:
        raise ConfigError(f"resume={resume.run_dir}: its checkpoint is at step {resume.step} after "
                          f"{resume.epochs_completed} epochs, which does not match {parts.steps_per_epoch} steps per "
                          "epoch here; the data or the batch size differ from that run's.")
    state.step = state.checkpoint_step = resume.step
    state.epochs_completed = resume.epochs_completed
    state.best_test_accuracy = resume.extras["best_test_accuracy"]
    state.final_train_loss = resume.extras["final_train_loss"]
    data_order.set_state(resume.extras["data_order"])


def _train_epoch(state: TrainState, parts: Components, settings: Settings, recorder: Recorder,
                 progress: Any, data_order: torch.Generator, signals: Optional[StopSignals]) -> bool:
    """One pass over the training set, closing a logging window every ``log_every`` steps; stops early when a
    window's loss triggers a stopping rule, the run's last step is taken, a stop signal arrives or a
    data-parallel peer is lost (``state.stop`` says which). Returns whether the epoch's last batch was trained on."""
    parts.model.train()
    state.epoch_loss_sum, state.epoch_n = 0.0, 0
    state.open_window()
    batches = iterate_batches(parts.splits.train_x, parts.splits.train_y, parts.splits.batch_size, data_order)
    for i, (x, y) in enumerate(batches):
        if parts.world_size > 1:
            x, y = parts.estimator.shard(x, y)  # same batch order on every rank (same seed): take our rows
        last_in_epoch = i == parts.steps_per_epoch - 1
        closes_window = ((state.step + 1) % settings.log_every == 0 or last_in_epoch
                         or state.step + 1 == parts.total_steps)
        try:
            if closes_window:
                # train/accuracy: this batch's accuracy at the parameters the step's loss is taken at (one extra
                # forward pass per window; estimators return the loss, not the logits), on copies of the buffers
                # so that batch norm's running statistics still move once per step.
                with torch.no_grad():
                    logits = forward_without_buffer_updates(parts.model, x)
                    state.batch_accuracy = _batch_accuracy(parts, logits, y)
            state.window_loss += _step(parts, x, y, settings.clip_grad_norm)
        except WorkerLostError as err:
            _stop(state, StopReason.WORKER_LOST, f"{_one_line(err)} {_kept(state)}")
            return False
        state.step += 1
        state.window_n += 1
        progress.update(1)
        if closes_window:
            state.stop = _close_window(state, parts, settings, recorder, progress)
            if state.stop is not None:
                return last_in_epoch
            state.open_window()
        if _interrupted(state, parts, settings, recorder, progress, signals, closes_window):
            return False
    return True


def _batch_accuracy(parts: Components, logits: Tensor, y: Tensor) -> Tensor:
    """Accuracy of ``logits`` on ``y``; in a data-parallel run over the whole batch (all ranks' rows), as in a
    single process."""
    correct = (logits.argmax(dim=1) == y).sum()
    if parts.world_size == 1:
        return correct.float() / y.shape[0]
    counts = parts.estimator.sum_over_ranks(torch.stack([correct, torch.tensor(y.shape[0], device=y.device)]))
    return counts[0].float() / counts[1]


def _interrupted(state: TrainState, parts: Components, settings: Settings, recorder: Recorder, progress: Any,
                 signals: Optional[StopSignals], window_closed: bool) -> bool:
    """Whether a stop signal ends the run after this step (then ``state.stop`` is set).

    A single process stops after the step the signal arrived in, logging the open window first. Data-parallel
    ranks must stop at the same step, so they agree at the end of each logging window (one all-reduce of a flag:
    stop if any rank received a signal).
    """
    if signals is None:
        return False
    received = signals.received is not None
    if parts.world_size > 1:
        if not window_closed:
            return False
        try:
            received = parts.estimator.any_rank(received)
        except WorkerLostError as err:
            _stop(state, StopReason.WORKER_LOST, f"{_one_line(err)} {_kept(state)}")
            return True
    if not received:
        return False
    if state.window_n:
        state.stop = _close_window(state, parts, settings, recorder, progress)
        if state.stop is not None and state.stop.ended_early:
            return True  # the open window's loss was not finite: that is the news
    by = signals.name or "a signal to another data-parallel worker"
    _stop(state, StopReason.INTERRUPTED, f"interrupted by {by} after step {state.step} of {parts.total_steps} "
          f"(epoch {math.ceil(state.step / parts.steps_per_epoch)} of {settings.epochs}). {_kept(state)}")
    return True


def _stop(state: TrainState, reason: StopReason, detail: str) -> None:
    state.stop, state.stop_detail = reason, detail


def _kept(state: TrainState) -> str:
    """What an early stop keeps (no evaluation or checkpoint of the partial epoch is made)."""
    if state.checkpoint_step is None:
        return ("No epoch had finished: there is no model.pt, and the held-out metrics are those of the "
                "initialisation.")
    return (f"model.pt and the held-out metrics are those of step {state.checkpoint_step}, the end of the last "
            f"finished epoch ({state.epochs_completed}); history.csv has every logged step.")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _step(parts: Components, x: Tensor, y: Tensor, clip: Optional[float]) -> Tensor:
    """One optimizer step on the batch ``(x, y)``; returns its loss, still on the device."""
    parts.optimizer.zero_grad(set_to_none=True)
    loss = compute_gradients(parts.estimator, parts.model, x, y)
    if clip is not None:
        nn.utils.clip_grad_norm_(parts.params, clip)
    parts.optimizer.step()
    if parts.scheduler is not None:
        parts.scheduler.step()
    return loss


def _close_window(state: TrainState, parts: Components, settings: Settings, recorder: Recorder,
                  progress: Any) -> Optional[StopReason]:
    """Read the window's loss (the one device synchronisation), log the point, check the stopping rules."""
    mean_loss = float(state.window_loss) / state.window_n
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
    ms = (time.perf_counter() - state.window_t0) * 1000.0 / state.window_n
    state.step_ms.append(ms)
    state.epoch_loss_sum += mean_loss * state.window_n
    state.epoch_n += state.window_n
    lr = parts.optimizer.param_groups[0]["lr"]
    values = {"train/loss": mean_loss, "train/accuracy": float(state.batch_accuracy), "lr": lr,
              "time/step_ms": ms}
    if parts.world_size > 1:
        values["comm/bytes_allreduced"] = parts.estimator.stats.bytes_allreduced
    recorder.log(state.step, state.step / parts.steps_per_epoch, state.elapsed(), values)
    progress.set_postfix(epoch=math.ceil(state.step / parts.steps_per_epoch), loss=f"{mean_loss:.4f}",
                         refresh=False)
    return _stop_rule(state, parts, settings, mean_loss, lr)


def _stop_rule(state: TrainState, parts: Components, settings: Settings, mean_loss: float, lr: float
               ) -> Optional[StopReason]:
    """The stopping rule a closed window triggers, if any (and ``state.stop_detail``, saying why)."""
    first = state.step - state.window_n + 1
    if not math.isfinite(mean_loss):
        state.stop_detail = (
            f"the training loss became {mean_loss} within steps {first}-{state.step} (epoch "
            f"{math.ceil(state.step / parts.steps_per_epoch)}, lr {lr:.3g}); training stopped. Lower "
            "optimization.learning_rate or set optimization.clip_grad_norm. The files written so far are kept; "
            "model.pt, if present, is the checkpoint of the last finished epoch."
        )
        return StopReason.NON_FINITE_LOSS
    threshold = settings.stop_loss_threshold
    if threshold is not None and mean_loss < threshold:
        state.stop_detail = (f"training loss {mean_loss:.4g} < optimization.stop_loss_threshold {threshold:.4g} "
                             f"at step {state.step}")
        return StopReason.LOSS_THRESHOLD
    if state.step >= parts.total_steps and state.step < settings.epochs * parts.steps_per_epoch:
        state.stop_detail = f"optimization.max_steps={settings.max_steps} steps taken"
        return StopReason.MAX_STEPS
    return None


def _evaluate(state: TrainState, parts: Components, settings: Settings, recorder: Recorder, epoch: float
              ) -> None:
    """Evaluate on the held-out set and log it at the current step."""
    loss, accuracy, state.predictions = evaluate(parts.model, parts.splits.test_x, parts.splits.test_y,
                                                 settings.eval_batch_size)
    state.test_loss, state.test_accuracy = loss, accuracy
    best = state.best_test_accuracy
    state.best_test_accuracy = accuracy if best is None else max(best, accuracy)
    recorder.log(state.step, epoch, state.elapsed(), {"test/loss": finite_or_none(loss), "test/accuracy": accuracy})


def _end_epoch(state: TrainState, parts: Components, settings: Settings, recorder: Recorder, cfg: DictConfig,
               epoch: int, data_order: torch.Generator) -> None:
    """After an epoch (or the part of one a stop ended): evaluate, log, checkpoint, write the history."""
    _evaluate(state, parts, settings, recorder, epoch=state.step / parts.steps_per_epoch)
    train_loss = state.final_train_loss if state.final_train_loss is not None else float("nan")
    log.info("epoch %d/%d  step %d  train loss %.4f  test loss %.4f  test acc %.4f", epoch + 1, settings.epochs,
             state.step, train_loss, state.test_loss, state.test_accuracy)
    at_epoch_end = state.step == state.epochs_completed * parts.steps_per_epoch
    extras = checkpoint_extras(parts, data_order, state.best_test_accuracy, state.final_train_loss, at_epoch_end)
    recorder.save_checkpoint(parts.model, cfg, state.step, state.epochs_completed, extras)
    state.checkpoint_step = state.step
    recorder.flush()
