"""Training a classifier with any gradient estimator: the loop behind ``mnist_fwdgrad.py`` and ``mnist_backprop.py``.

    from fwdgrad.experiments.training import train
    metrics = train(cfg, output_dir)        # cfg: the composed configs/mnist_fwdgrad.yaml (or _backprop)

Modules: :mod:`~fwdgrad.experiments.training.run` (process spawning, one process's run), :mod:`~fwdgrad.experiments.training.loop`
(the loop over an explicit state), :mod:`~fwdgrad.experiments.training.factory` (settings and objects from the config),
:mod:`~fwdgrad.experiments.training.recorder` (the files) and :mod:`~fwdgrad.experiments.training.run_files` (their names and columns).
"""

from fwdgrad.experiments.training.factory import Components, Settings, build_components, read_settings, resolve_device
from fwdgrad.experiments.training.loop import TrainState, compute_gradients, evaluate, fit
from fwdgrad.experiments.training.recorder import Recorder
from fwdgrad.experiments.training.run import run, train, train_process
from fwdgrad.experiments.training.run_files import (
    HISTORY_COLUMNS,
    METRIC_KEYS,
    STOP_REASONS,
    TB_TAGS,
    StopReason,
)

__all__ = [
    "Components",
    "HISTORY_COLUMNS",
    "METRIC_KEYS",
    "Recorder",
    "STOP_REASONS",
    "Settings",
    "StopReason",
    "TB_TAGS",
    "TrainState",
    "build_components",
    "compute_gradients",
    "evaluate",
    "fit",
    "read_settings",
    "resolve_device",
    "run",
    "train",
    "train_process",
]
