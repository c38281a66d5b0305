"""``resume=<run dir>``: continue a run from its last checkpoint, exactly as if it had not stopped.

A checkpoint (``model.pt``, written at the end of every finished epoch) holds, besides the model's weights and
the resolved config, everything the rest of the run depends on (:func:`checkpoint_extras`): the optimizer's and
the scheduler's state, the data-order generator (the permutation of the next epoch), the estimator's random
state (:meth:`~fwdgrad.estimators.GradientEstimator.state_dict`: the next tangents), torch's global random state,
and the step, epoch and best held-out accuracy. The resumed run

* uses the earlier run's config (:func:`resume_config`): only settings that say *how* or *where* it runs, never
  what it computes (:data:`MAY_CHANGE`), may be given anew; another key that differs is refused;
* writes into a new run directory (the earlier one is left as it was), starting its ``history.csv`` with the
  earlier rows up to the checkpoint;
* continues at the next epoch: with the same settings its weights after the last epoch equal those of a run that
  was never interrupted (a test checks this, bit for bit on the CPU).

A checkpoint that is not at the end of an epoch (a run stopped by ``max_steps`` or ``stop_loss_threshold``), a
run whose estimator cannot save its random state, or one that already ran all its epochs is refused with a
:class:`~fwdgrad.errors.ConfigError` saying so.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from fwdgrad.errors import ConfigError

__all__ = ["MAY_CHANGE", "Resume", "checkpoint_extras", "history_rows", "load_resume", "restore", "resume_config"]

log = logging.getLogger(__name__)

_ABSENT = object()

#: Top-level keys a resumed run may set anew: how and where it runs, and what it logs, never what it computes.
MAY_CHANGE = ("device", "threads", "tune_malloc", "progress_bar", "plot_misclassified", "eval_batch_size",
              "log_every", "distributed", "overwrite", "resume")


@dataclass
class Resume:
    """A checkpoint to continue from: the run directory, the loaded ``model.pt`` and the earlier run's config."""

    run_dir: Path
    checkpoint: Dict[str, Any]

    @property
    def extras(self) -> Dict[str, Any]:
        return self.checkpoint["resume"]

    @property
    def step(self) -> int:
        return int(self.checkpoint["step"])

    @property
    def epochs_completed(self) -> int:
        return int(self.checkpoint["epoch"])


def checkpoint_extras(parts: Any, data_order: torch.Generator, best_test_accuracy: Optional[float],
                      final_train_loss: Optional[float], at_epoch_end: bool) -> Dict[str, Any]:
    """What a checkpoint needs besides the weights for :func:`restore` (module docstring)."""
    return {
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "data_order": data_order.get_state(),
        "estimator": parts.estimator.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "best_test_accuracy": best_test_accuracy,
        "final_train_loss": final_train_loss,
        "at_epoch_end": at_epoch_end,
    }


def read_checkpoint(path: Path, what: str) -> Any:
    """Load the checkpoint ``path`` after verifying it against the SHA-256 written beside it
    (:func:`fwdgrad.experiments.training.recorder.write_checkpoint`): a damaged file (flipped bits, a partial copy)
    is refused by a :class:`ConfigError` naming it, never loaded. A checkpoint with no checksum beside it (copied
    alone) is loaded with a warning."""
    from fwdgrad.experiments.training.run_files import checksum_path

    data = path.read_bytes()
    sums = checksum_path(path)
    if sums.is_file():
        expected = sums.read_text().split()[0] if sums.read_text().split() else ""
        if hashlib.sha256(data).hexdigest() != expected:
            raise ConfigError(
                f"{what}: {path} does not match the checksum written beside it ({sums.name}): the file is damaged "
                "(changed bits, an incomplete copy, or the run was killed while writing it), and a run continued "
                "from it would start from wrong weights. Resume from an intact copy, or start a new run.")
    else:
        log.warning("%s: %s has no checksum beside it (%s), so it cannot be verified; loading it as it is",
                    what, path, sums.name)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which
        raise ConfigError(f"{what}: {path} cannot be read as a checkpoint ({e}).") from None


def load_resume(run_dir: str | Path) -> Resume:
    """Read ``<run_dir>/model.pt`` and check that it can be continued; :class:`ConfigError` says why not."""
    from fwdgrad.experiments.training.run_files import CHECKPOINT_FILE

    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: there is no {path}; a run has a checkpoint once its first epoch has "
                          "ended (an earlier run that stopped in its first epoch has nothing to resume).")
    checkpoint = read_checkpoint(path, f"resume={run_dir}")
    extras = checkpoint.get("resume") if isinstance(checkpoint, dict) else None
    if extras is None:
        raise ConfigError(f"resume={run_dir}: {path} holds only the model's weights (it was written by an older "
                          "fwdgrad), not the optimizer and random states a resumed run needs.")
    if extras.get("estimator") is None:
        raise ConfigError(f"resume={run_dir}: its estimator cannot save its random state (state_dict() is None), "
                          "so a resumed run could not draw the tangents the run would have drawn.")
    if not extras.get("at_epoch_end"):
        raise ConfigError(f"resume={run_dir}: its checkpoint (step {checkpoint['step']}) is not at the end of an "
                          "epoch: that run stopped on optimization.max_steps or stop_loss_threshold, and ended there.")
    epochs = int(checkpoint["config"]["optimization"]["epochs"])
    if int(checkpoint["epoch"]) >= epochs:
        raise ConfigError(f"resume={run_dir}: that run finished all its {epochs} epochs; nothing is left to run.")
    return Resume(run_dir=run_dir, checkpoint=checkpoint)


def resume_config(cfg: DictConfig, resume: Resume, explicit: Optional[Sequence[str]]) -> DictConfig:
    """The resumed run's config: the earlier run's, with the :data:`MAY_CHANGE` keys taken from ``cfg``.

    ``explicit`` are the command-line overrides (Hydra), whose keys must not change anything else; without them
    (the Python API) every key of ``cfg`` outside :data:`MAY_CHANGE` must equal the earlier run's.
    """
    saved = OmegaConf.create(resume.checkpoint["config"])
    theirs_all = resume.checkpoint["config"]
    current = OmegaConf.to_container(cfg, resolve=True)
    keys = sorted({_override_key(o) for o in explicit} if explicit is not None else _flat_keys(current))
    for key in keys:
        if key.split(".")[0] in MAY_CHANGE:
            continue
        mine, theirs = _lookup(current, key), _lookup(theirs_all, key)
        if theirs is _ABSENT or mine != theirs:
            there = "absent" if theirs is _ABSENT else repr(theirs)
            here = "absent" if mine is _ABSENT else repr(mine)
            raise ConfigError(
                f"resume={resume.run_dir} continues that run with its own config, and `{key}` differs from it "
                f"({here} here, {there} there). Drop it from the command line; only {', '.join(MAY_CHANGE)} may "
                "change on resume."
            )
    for key in MAY_CHANGE:
        if key in cfg:
            saved[key] = cfg[key]
    saved["resume"] = str(resume.run_dir)
    return saved


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _flat_keys(container: Any, prefix: str = "") -> List[str]:
    if not isinstance(container, dict):
        return [prefix[:-1]]
    return [k for key, value in container.items() for k in _flat_keys(value, f"{prefix}{key}.")]


def _lookup(container: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(container, dict) or part not in container:
            return _ABSENT
        container = container[part]
    return container


def restore(parts: Any, resume: Resume) -> None:
    """Load the checkpoint's weights and states into the freshly built ``parts`` (a ``Components``)."""
    extras = resume.extras
    parts.model.load_state_dict(resume.checkpoint["state_dict"])
    parts.optimizer.load_state_dict(extras["optimizer"])
    if parts.scheduler is not None and extras["scheduler"] is not None:
        parts.scheduler.load_state_dict(extras["scheduler"])
    parts.estimator.load_state_dict(extras["estimator"])
    torch.set_rng_state(extras["torch_rng"])
    if extras.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extras["cuda_rng"])
    log.info("resumed %s at step %d (end of epoch %d)", resume.run_dir, resume.step, resume.epochs_completed)


def history_rows(resume: Resume) -> List[Dict[str, float]]:
    """The earlier run's ``history.csv`` rows up to the checkpoint's step (empty cells left out)."""
    from fwdgrad.experiments.training.run_files import HISTORY_FILE

    path = resume.run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    out = []
    for row in rows:
        if row.get("step", float("inf")) <= resume.step:
            row["step"] = int(row["step"])
            out.append(row)
    return out
