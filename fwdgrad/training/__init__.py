"""Training a classifier with any gradient estimator: the loop behind ``mnist_fwdgrad.py`` and ``mnist_backprop.py``.

    from fwdgrad.training import train
    metrics = train(cfg, output_dir)        # cfg: the composed configs/mnist_fwdgrad.yaml (or _backprop)

Modules: :mod:`~fwdgrad.training.run` (process spawning, one process's run), :mod:`~fwdgrad.training.loop`
(the loop over an explicit state), :mod:`~fwdgrad.training.factory` (settings and objects from the config),
:mod:`~fwdgrad.training.recorder` (the files) and :mod:`~fwdgrad.training.run_files` (their names and columns).
"""

from fwdgrad.training.factory import Components, Settings, build_components, read_settings, resolve_device
from fwdgrad.training.loop import TrainState, compute_gradients, evaluate, fit
from fwdgrad.training.recorder import Recorder
from fwdgrad.training.run import run, train, train_process
from fwdgrad.training.run_files import (
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
