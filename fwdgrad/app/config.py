"""Building objects from Hydra configs, with one kind of error for every bad value.

Every entry point builds its objects (dataset, model, estimator, optimizer, scheduler, test function, gradient
source) through :func:`build`, so a value the target rejects becomes one :class:`~fwdgrad.errors.ConfigError`
naming the config key, whatever the script. Optimizers and learning-rate schedulers are ``_partial_: true``
nodes completed at run time by :func:`build_optimizer` and :func:`build_scheduler`; a schedule's length, known
only at run time, is declared ``???`` in YAML and filled in here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Optional, Sequence

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fwdgrad.errors import ConfigError, DatasetError

__all__ = [
    "SCHEDULE_LENGTH_KEYS",
    "build",
    "build_optimizer",
    "build_scheduler",
    "check_learning_rate",
    "optional_positive",
    "threads",
]

log = logging.getLogger(__name__)

#: Names torch's schedulers give the number of steps a schedule spans (LinearLR, ConstantLR: ``total_iters``;
#: CosineAnnealingLR: ``T_max``; OneCycleLR: ``total_steps``). A scheduler config leaves it ``???`` and
#: :func:`build_scheduler` passes the run's number of optimizer steps.
SCHEDULE_LENGTH_KEYS = ("total_iters", "T_max", "total_steps")


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def build(node: Any, what: str, *, expected: Optional[type] = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` with errors a user can act on.

    Args:
        node: a config node with a ``_target_``.
        what: the config key it comes from (``optimization.optimizer``), named in the error message.
        expected: if given, the built object must be an instance of it.
        kwargs: values known only at run time (``input_shape=...``), passed to the target.

    Raises:
        ConfigError: the node has no ``_target_``, a value is missing (``???``), or the target rejected its
            arguments (its ``ValueError``/``TypeError``/``ConfigError`` is the message), or it built the wrong
            type. A :class:`DatasetError` from the target passes through unchanged, and a ``PermissionError``
            becomes one naming the path; anything else (a bug) propagates as it is.
    """
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"`{what}` must be a config node with a `_target_`, got {node!r}; choose one of the "
                          f"files of its config group (configs/) or write the node in full.")
    target = node.get("_target_")
    try:
        obj = instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = _root_cause(err)
        if isinstance(cause, DatasetError):
            raise cause from None
        if isinstance(cause, PermissionError):  # e.g. a data folder this user may not read
            from fwdgrad.experiments.data import unreadable

            raise unreadable(cause.filename or target, cause) from None
        if isinstance(cause, (ValueError, TypeError, OmegaConfBaseException)):
            raise ConfigError(f"cannot build `{what}` ({target}) from the config: {cause}") from None
        raise
    except OmegaConfBaseException as err:  # e.g. a `???` value nobody filled in, or a broken interpolation
        raise ConfigError(f"cannot build `{what}` ({target}) from the config: {err}".replace("\n", " ")) from None
    if expected is not None and not isinstance(obj, expected):
        raise ConfigError(f"`{what}._target_` must build a {expected.__name__}, got {type(obj).__name__} from "
                          f"{target!r}.")
    return obj


def build_optimizer(node: DictConfig, params: Sequence[torch.Tensor], what: str = "optimization.optimizer"
                    ) -> torch.optim.Optimizer:
    """The ``_partial_`` optimizer node applied to ``params``."""
    factory = build(node, what)
    if not callable(factory) or isinstance(factory, torch.optim.Optimizer):
        raise ConfigError(f"`{what}` must be a partial optimizer (`_partial_: true`), got {type(factory).__name__}.")
    try:
        optimizer = factory(list(params))
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"cannot build `{what}` ({node.get('_target_')}): {err}. Check its keys against the optimizer's "
            "arguments; to change optimizer, choose another file of the group (optimization=sgd, "
            "optimization=adam) rather than only its `_target_`."
        ) from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"`{what}` built a {type(optimizer).__name__}, not a torch.optim.Optimizer.")
    return optimizer


def build_scheduler(node: Optional[DictConfig], optimizer: torch.optim.Optimizer, total_steps: int,
                    what: str = "optimization.scheduler") -> Optional[Any]:
    """The ``_partial_`` learning-rate scheduler node applied to ``optimizer``; ``None`` for a null node.

    A schedule's length left ``???`` under one of :data:`SCHEDULE_LENGTH_KEYS` is set to ``total_steps``, the
    number of optimizer steps of the run (the scheduler is stepped once per optimizer step).
    """
    if node is None:
        return None
    # (`k in node` is False for a `???` value: ask the keys)
    sizes = {k: int(total_steps) for k in SCHEDULE_LENGTH_KEYS if k in node.keys() and OmegaConf.is_missing(node, k)}
    factory = build(node, what, **sizes)
    try:
        return factory(optimizer)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"cannot build `{what}` ({node.get('_target_')}): {err}. It must be a partial "
            "torch.optim.lr_scheduler (`_partial_: true`), e.g. optimization/scheduler=constant."
        ) from None


def check_learning_rate(value: Any, key: str = "optimization.learning_rate") -> float:
    """The learning rate as a float, if it is a finite number > 0 (torch accepts inf, and nan only fails deep in
    the optimizer); else :class:`ConfigError`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"`{key}` must be a finite number > 0, got {value!r}; e.g. {key}=0.01.")
    return float(value)


def optional_positive(value: Any, key: str, cast: type = float) -> Any:
    """``None`` stays ``None`` (the feature is off); anything else must be a finite number > 0."""
    if value is None:
        return None
    try:
        v = cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a positive number or null (off), got {value!r}.") from None
    if not v > 0 or not math.isfinite(v):
        raise ConfigError(f"{key} must be positive or null (off), got {value!r}.")
    return v


@contextlib.contextmanager
def threads(count: Optional[int], key: str = "threads") -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(count)`` (``None``: torch's default), restoring it after.

    Yields the number of intra-op threads in effect.
    """
    before = torch.get_num_threads()
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{key} must be a positive integer or null (torch's default: all cores), "
                              f"got {count!r}.")
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
