"""The one definition of what a training run leaves in its directory: file names, columns, tags, stop reasons.

The training loop writes these (:mod:`fwdgrad.experiments.training.recorder`), ``compare.py`` reads them
(:mod:`fwdgrad.experiments.compare.runs`); both import the names from here, so the contract cannot drift apart::

    <run>/.hydra/config.yaml   the composed config (written by Hydra)
    <run>/<job>.log            the log (written by Hydra's logging)
    <run>/run.json             the run's status: written when training starts ("running", with the pid and host)
                               and rewritten when it ends (the stop reason, or "failed" with the error); a
                               directory with this file and no metrics.json holds an unfinished run (killed, or
                               still running)
    <run>/metrics.json         METRIC_KEYS (and a few more), written once, when training ends, also when it ends
                               early (``stopped`` says why): a directory holds an ended run exactly when it holds
                               this file
    <run>/history.csv          HISTORY_COLUMNS, one row per logged point, empty cells where nothing was measured
    <run>/tb/                  TensorBoard scalars TB_TAGS (the same names as the history columns)
    <run>/model.pt             the checkpoint after every finished epoch: the model's state_dict, the resolved
                               config, step and epoch, and what ``resume=<run>`` needs to continue from there
                               (optimizer, scheduler, data-order and estimator random states)
    <run>/plots.png            loss/accuracy curves and misclassified held-out images

``global_optim.py`` writes ``metrics.json`` (OPTIM_METRIC_KEYS) and ``history.csv`` too, for its estimator under
test; there ``train/loss`` is the optimality gap ``f(x_t) - f*`` (:func:`fwdgrad.experiments.global_optim.optimize.write_run_files`).
"""

from __future__ import annotations

import enum
from pathlib import Path

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "HISTORY_COLUMNS",
    "HISTORY_FILE",
    "METRICS_FILE",
    "METRIC_KEYS",
    "OPTIM_METRIC_KEYS",
    "PLOTS_FILE",
    "RUN_STATUS_FILE",
    "CHECKSUM_FILE",
    "checksum_path",
    "STOP_REASONS",
    "StopReason",
    "TB_DIR",
    "TB_TAGS",
]

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "model.pt"
#: Beside the checkpoint: its SHA-256 (``sha256sum`` format), verified before a checkpoint is resumed.
CHECKSUM_FILE = CHECKPOINT_FILE + ".sha256"
PLOTS_FILE = "plots.png"
RUN_STATUS_FILE = "run.json"
TB_DIR = "tb"
#: Relative to the run directory; Hydra writes it before the run starts.
CONFIG_FILE = Path(".hydra") / "config.yaml"

#: Columns of ``history.csv`` (one row per logged point; empty cells where a value is not available;
#: ``comm/bytes_allreduced`` only in data-parallel runs).
HISTORY_COLUMNS = (
    "step", "epoch", "wall_time_s", "train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr",
    "time/step_ms", "comm/bytes_allreduced",
)
#: TensorBoard scalar tags (the same names as the history columns).
TB_TAGS = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "time/step_ms")
#: Keys every ``metrics.json`` has.
METRIC_KEYS = (
    "final_test_accuracy", "best_test_accuracy", "final_test_loss", "final_train_loss", "final_train_accuracy",
    "steps", "epochs_completed", "wall_time_s", "step_time_ms", "peak_memory_mb", "peak_memory_source", "stopped",
    "stop_detail", "estimator", "dataset", "model", "device",
)

#: Keys every ``metrics.json`` of a global-optimisation run has (f values, their gaps to the minimum f*).
OPTIM_METRIC_KEYS = (
    "final_value", "best_value", "min_value", "final_gap", "best_gap", "distance_to_minimum", "steps",
    "wall_time_s", "step_time_ms", "stopped", "estimator", "function", "dim",
)


class StopReason(str, enum.Enum):
    """Why training ended; ``metrics.json["stopped"]`` holds the value (a plain string)."""

    COMPLETED = "completed"  #: every epoch ran
    MAX_STEPS = "max_steps"  #: ``optimization.max_steps`` optimizer steps were taken before the last epoch ended
    LOSS_THRESHOLD = "loss_threshold"  #: a logging window's mean training loss fell below the threshold
    NON_FINITE_LOSS = "non_finite_loss"  #: a logging window's mean training loss was nan or inf
    INTERRUPTED = "interrupted"  #: SIGINT or SIGTERM; the run stopped after the step it was taking
    WORKER_LOST = "worker_lost"  #: a data-parallel peer died or stopped answering
    EARLY_STOPPING = "early_stopping"  #: global_optim: ``early_stopping_patience`` steps without a decrease of f

    @property
    def ended_early(self) -> bool:
        """A stop that left no evaluation or checkpoint of the partial epoch: ``model.pt`` and the held-out
        metrics are those of the last finished epoch."""
        return self in (StopReason.NON_FINITE_LOSS, StopReason.INTERRUPTED, StopReason.WORKER_LOST)


#: Values of ``metrics.json["stopped"]``.
STOP_REASONS = tuple(r.value for r in StopReason)


def checksum_path(path: Path) -> Path:
    """Where the SHA-256 of the file ``path`` is kept: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")
