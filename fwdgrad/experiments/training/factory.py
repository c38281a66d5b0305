"""Everything a training process needs, read and built from the composed config before the first step.

:func:`read_settings` checks the scalar settings (cheap, before any data is loaded, and before worker processes
are spawned); :func:`build_components` builds the dataset, the model (shaped by the data), the gradient
estimator, the optimizer and the learning-rate scheduler, each through :func:`fwdgrad.app.config.build`, so a bad
value is one :class:`~fwdgrad.errors.ConfigError` naming its key.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from fwdgrad.app.config import build, build_optimizer, build_scheduler, check_learning_rate, optional_positive
from fwdgrad.experiments.data import Splits
from fwdgrad.parallel import DataParallelEstimator
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import GradientEstimator, check_seed

__all__ = ["Components", "Settings", "build_components", "read_settings", "resolve_device"]

log = logging.getLogger(__name__)

TUNE_MALLOC_CHOICES = ("auto", True, False)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} ({e}); use device=auto, cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available; use device=auto or device=cpu.")
    return device


@dataclass(frozen=True)
class Settings:
    """The validated scalar settings of a training run (see ``configs/mnist.yaml`` for each key)."""

    epochs: int
    max_steps: Optional[int]
    clip_grad_norm: Optional[float]
    stop_loss_threshold: Optional[float]
    log_every: int
    eval_batch_size: int
    seed: int
    device: torch.device
    progress_bar: bool
    plot_misclassified: int
    threads: Optional[int]
    tune_malloc: Any  # "auto" | True | False


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}.")
    return value


def read_settings(cfg: DictConfig) -> Settings:
    """Check and convert the scalar settings; raises :class:`ConfigError` naming the first bad key."""
    opt = cfg.optimization
    check_learning_rate(opt.get("learning_rate"))
    tune = cfg.get("tune_malloc", "auto")
    if tune not in TUNE_MALLOC_CHOICES:
        raise ConfigError(f"tune_malloc must be auto, true or false, got {tune!r}.")
    threads = cfg.get("threads")
    if threads is not None:
        _positive_int(threads, "threads")
    return Settings(
        epochs=_positive_int(opt.epochs, "optimization.epochs"),
        max_steps=optional_positive(opt.max_steps, "optimization.max_steps", int),
        clip_grad_norm=optional_positive(opt.clip_grad_norm, "optimization.clip_grad_norm"),
        stop_loss_threshold=optional_positive(opt.stop_loss_threshold, "optimization.stop_loss_threshold"),
        log_every=_positive_int(cfg.log_every, "log_every"),
        eval_batch_size=_positive_int(cfg.eval_batch_size, "eval_batch_size"),
        seed=check_seed(cfg.seed),
        device=resolve_device(str(cfg.device)),
        progress_bar=bool(cfg.progress_bar),
        plot_misclassified=int(cfg.plot_misclassified),
        threads=threads,
        tune_malloc=tune,
    )


@dataclass
class Components:
    """The objects one training process works with."""

    splits: Splits  #: on the training device
    model: nn.Module
    estimator: GradientEstimator  #: wrapped in a DataParallelEstimator when world_size > 1
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any]  #: stepped once per optimizer step; None keeps the learning rate constant
    params: List[nn.Parameter]
    steps_per_epoch: int
    total_steps: int  #: what the run takes: epochs * steps_per_epoch, or fewer with max_steps
    world_size: int
    data_load_s: float


def build_components(cfg: DictConfig, settings: Settings, world_size: int = 1) -> Components:
    """Build data, model, estimator, optimizer and scheduler from ``cfg`` (seeding the initialisation)."""
    t0 = time.perf_counter()
    splits: Splits = build(cfg.dataset, "dataset", expected=Splits)
    data_load_s = time.perf_counter() - t0
    log.info("data %s (loaded in %.1f s)", splits.describe(), data_load_s)
    torch.manual_seed(settings.seed)  # the initialisation
    model: nn.Module = build(cfg.model, "model", expected=nn.Module, input_shape=list(splits.input_shape),
                             num_classes=splits.num_classes, _convert_="all").to(settings.device)
    estimator: GradientEstimator = build(cfg.gradient, "gradient", expected=GradientEstimator)
    if world_size > 1:
        # Every rank computes on its shard of each batch; forward gradients all-reduce k scalars, backprop n.
        estimator = DataParallelEstimator(estimator)
    params = [p for p in model.parameters() if p.requires_grad]
    check_memory = getattr(getattr(estimator, "estimator", estimator), "check_memory", None)
    if check_memory is not None:  # a setting whose tangents cannot fit is refused before the run starts
        check_memory({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    steps_per_epoch = math.ceil(splits.train_x.shape[0] / splits.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    optimizer = build_optimizer(cfg.optimization.optimizer, params)
    scheduler = build_scheduler(cfg.optimization.get("scheduler"), optimizer, total_steps)
    log.info("model %s with %d parameters on %s; estimator %s; optimizer %s, scheduler %s",
             type(model).__name__, sum(p.numel() for p in params), settings.device, estimator.describe(),
             type(optimizer).__name__, type(scheduler).__name__ if scheduler is not None else "none")
    return Components(splits=splits.to(settings.device), model=model, estimator=estimator, optimizer=optimizer,
                      scheduler=scheduler, params=params, steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, world_size=world_size, data_load_s=data_load_s)
