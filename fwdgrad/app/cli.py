"""The one error path of every entry point (``mnist_*.py``, ``global_optim.py``, ``approx_quality.py``,
``compare.py``, ``scripts/bench.py``).

Hydra scripts are thin::

    @hydra.main(version_base="1.3", config_path="configs", config_name="mnist_fwdgrad")
    @hydra_task
    def main(cfg): return run(cfg)

    if __name__ == "__main__":
        run_hydra(main)

and behave alike:

* a :class:`~fwdgrad.errors.UserError` (a bad config value, missing data, no run to compare) is logged as one
  ``[ERROR]`` paragraph (console and ``<job>.log``), without a traceback, and the process exits with status 2;
  so does a config Hydra itself cannot compose (an unknown key, a missing group option);
* a :class:`~fwdgrad.errors.RunError` (the run started and failed; its files are kept), including a training
  run stopped by a non-finite loss, is logged the same way and exits with status 1; inside a ``-m`` multirun
  the sweep goes on to its next job instead;
* :class:`~fwdgrad.errors.Interrupted` (SIGINT/SIGTERM stopped the run after writing its files) is logged as a
  warning and exits with status 128 + the signal's number, also ending a multirun; a second Ctrl-C, which
  stops at once (``KeyboardInterrupt``), exits with status 130;
* anything else is a bug: its traceback is logged and the process exits with status 1.

A sweeper that optimises (``hydra/sweeper=lr_search``, Hydra's Optuna plugin) needs one number per job: when the
config has a top-level ``objective`` (the lr_search config sets ``objective: final_test_loss``), the task returns
that entry of the task's result instead of the whole dict, and ``+inf`` for a run that failed or whose value is
not finite (frog's convention: a diverged learning rate is the worst, not an error that stops the study).

Argparse scripts use :func:`run_cli`: ``prog: error: message`` on stderr and status 2 (as argparse does for a
bad argument), 1 for a :class:`~fwdgrad.errors.RunError`.

Run directories: every Hydra script includes ``configs/hydra/default.yaml``, which names them
``outputs/<config name>/<date>_<time with microseconds>-<pid>`` (multirun: ``..._multirun/<job>_<overrides>``),
so two jobs started in the same second never share one (the ``${pid:}`` resolver it uses, and ``${lookup:...}``,
are registered by :func:`fwdgrad.app.process.prepare_process`, see :mod:`fwdgrad.app.resolvers`). The callback
that file installs is :class:`RunDirGuard`: a run directory given by hand
(``hydra.run.dir=...``) that already holds files is refused before Hydra writes into it, unless the config says
``overwrite=true`` (:mod:`fwdgrad.app.rundir`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, TypeVar, Union

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fwdgrad.errors import ConfigError, Interrupted, RunError, UserError
from fwdgrad.app.resolvers import torchrun_agent
from fwdgrad.app.rundir import (
    STORAGE_ERRNOS,
    check_writable,
    claim_run_dir,
    mark_claimed,
    remove_partial_files,
    wait_for_claim,
)

__all__ = ["EntryExit", "RunDirGuard", "hydra_task", "objective_value", "one_paragraph", "run_cli",
           "run_hydra"]

log = logging.getLogger(__name__)
T = TypeVar("T")

class EntryExit(SystemExit):
    """The process exit an entry point decided on, after reporting why (its status is final)."""


def one_paragraph(err: BaseException) -> str:
    """The error's message on one line (messages are one paragraph; a stray newline must not split a log)."""
    return " ".join(str(err).split()) or type(err).__name__


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_name(default: str) -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.name if HydraConfig.initialized() else default


def _objective_key(cfg: Any) -> Optional[str]:
    """The config's ``objective`` (what to return to an optimising sweeper), or None."""
    return cfg.get("objective") if isinstance(cfg, (DictConfig, Mapping)) else None


def objective_value(cfg: DictConfig, result: Any) -> float:
    """``result[cfg.objective]`` as a float for an optimising sweeper; ``+inf`` when it is missing or not finite.

    Raises :class:`ConfigError` when ``objective`` names no entry of the result.
    """
    key = _objective_key(cfg)
    if not isinstance(result, Mapping) or key not in result:
        numbers = result.items() if isinstance(result, Mapping) else ()
        keys = ", ".join(str(k) for k, v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(f"objective={key!r} is not a result of this script; it returns: {keys or 'no numbers'}. "
                          "Set objective to one of them (e.g. objective=final_test_loss).")
    value = result[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        log.warning("objective %s = %r is not a finite number: reported to the sweeper as +inf", key, value)
        return math.inf
    return float(value)


def hydra_task(fn: Callable[[DictConfig], T]) -> Callable[[DictConfig], Union[T, float, None]]:
    """Wrap a Hydra task function with the shared error handling and timing (module docstring)."""

    @functools.wraps(fn)
    def task(cfg: DictConfig) -> Union[T, float, None]:
        t0 = time.perf_counter()
        status = "failed"
        try:
            result = fn(cfg)
            value = objective_value(cfg, result) if _objective_key(cfg) is not None else result
            status = "finished"
            return value
        except UserError as err:
            log.error("%s", one_paragraph(err))
            raise EntryExit(err.exit_code) from None
        except OmegaConfBaseException as err:  # a key the code reads is absent or cannot be resolved
            log.error("%s", one_paragraph(ConfigError(f"the config cannot be read: {err}")))
            raise EntryExit(ConfigError.exit_code) from None
        except Interrupted as err:
            status = "interrupted"
            log.warning("%s", one_paragraph(err))
            raise EntryExit(err.exit_code) from None  # a user who stops a job means the whole sweep
        except RunError as err:
            log.error("%s", one_paragraph(err))
            if _in_multirun():  # this job failed (its files are kept); the sweep goes on
                return math.inf if _objective_key(cfg) is not None else None
            raise EntryExit(err.exit_code) from None
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                log.exception("unexpected error (a bug in fwdgrad: please report it with this traceback)")
                raise EntryExit(1) from None
            log.error("%s", _storage_failure(err))
            if _in_multirun():
                return math.inf if _objective_key(cfg) is not None else None
            raise EntryExit(1) from None
        except KeyboardInterrupt:
            status = "interrupted"
            log.warning("stopped at once by a second interrupt: the files are those written before it (run.json "
                        "says so for a training run; its model.pt is the last finished epoch's)")
            raise EntryExit(130) from None
        except Exception:
            log.exception("unexpected error (a bug in fwdgrad: please report it with this traceback)")
            raise EntryExit(1) from None
        finally:
            log.info("%s %s after %.1f s", _job_name(fn.__name__), status, time.perf_counter() - t0)
            _flush_logs()

    return task


def _storage_failure(err: OSError) -> str:
    """One paragraph for a write that failed for lack of room or rights, after removing partial files."""
    removed = []
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        removed = remove_partial_files(Path(HydraConfig.get().runtime.output_dir))
    return one_paragraph(RunError(
        f"the run stopped: writing {err.filename or 'a file'} failed ({err.strerror or err}: the disk is full, a "
        "file-size limit was reached, or the directory is not writable). The files it finished before are intact "
        "(each is replaced whole or not at all; model.pt is the last finished epoch's)"
        + (f"; the partial {', '.join(removed)} were removed" if removed else "")
        + ". Make room or choose another hydra.run.dir, then continue with resume=<this run directory> if a "
        "checkpoint was written."))


_INTERVAL = re.compile(r"interval\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")


def check_search_intervals(config: DictConfig) -> None:
    """A sweep's search spaces (the sweeper's ``params`` and the command line's ``interval(...)`` overrides) are
    intervals ``low < high``, with ``low > 0`` on a log scale (``tag(log, ...)``); else a :class:`ConfigError`
    naming the key, before the sweeper (Optuna) starts."""
    hydra_cfg = config.get("hydra") or {}
    sweeper = hydra_cfg.get("sweeper") or {}
    params = dict(sweeper.get("params") or {})
    for override in (hydra_cfg.get("overrides") or {}).get("task") or []:
        key, _, value = str(override).partition("=")
        if "interval(" in value:
            params[key.lstrip("+~")] = value
    for key, value in params.items():
        text = str(value)
        match = _INTERVAL.search(text)
        if match is None:
            continue
        try:
            low, high = float(match.group(1)), float(match.group(2))
        except ValueError:
            raise ConfigError(f"{key}={text}: the bounds of interval(low, high) must be numbers.") from None
        log_scale = "tag(log" in text.replace(" ", "")
        if not low < high:
            raise ConfigError(f"{key}={text}: the search interval is empty or inverted (low {low:g} >= high "
                              f"{high:g}); write interval(low, high) with low < high, e.g. interval(1e-6, 1.0).")
        if log_scale and low <= 0:
            raise ConfigError(f"{key}={text}: a log-scale search (tag(log, ...)) needs bounds > 0, got low {low:g}; "
                              "e.g. tag(log, interval(1e-6, 1.0)).")


class RunDirGuard(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): claim the run (or sweep) directory before Hydra writes
    ``.hydra/`` into it, so that a refused directory keeps the earlier run's files as they were.

    Logging is not configured yet at this point, so a refusal goes to stderr as one ``[ERROR]`` line; the
    process exits with status 2.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim(config.hydra.run.dir, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_search_intervals(config)
        except UserError as err:
            sys.stderr.write(f"[ERROR] {one_paragraph(err)}\n")
            raise EntryExit(err.exit_code) from None
        self._claim(config.hydra.sweep.dir, config)

    @staticmethod
    def _claim(run_dir: str, config: DictConfig) -> None:
        try:
            agent = torchrun_agent()
            job = f"torchrun-{agent}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
            if agent is not None and int(os.environ.get("RANK", "0")) > 0:  # rank 0 claims for the whole job
                wait_for_claim(Path(str(run_dir)), job)
                return
            resume = config.get("resume")
            claim_run_dir(Path(str(run_dir)), overwrite=bool(config.get("overwrite", False)),
                          keep=Path(str(resume)) if resume else None)
            check_writable(Path(str(run_dir)))
            if agent is not None:
                mark_claimed(Path(str(run_dir)), job)
        except UserError as err:
            sys.stderr.write(f"[ERROR] {one_paragraph(err)}\n")
            raise EntryExit(err.exit_code) from None


def run_hydra(main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function, giving Hydra's own config errors the exit status of a config error.

    Hydra reports a config it cannot compose (an unknown key, a missing option, a bad override) itself and
    exits with status 1; every failure inside the task exits through :class:`EntryExit` with its final status,
    so an exit with status 1 that is not an :class:`EntryExit` is such a config error: status 2.
    """
    try:
        main()
    except EntryExit:
        raise
    except SystemExit as exit_:
        if exit_.code == 1:
            raise SystemExit(ConfigError.exit_code) from None
        raise


def run_cli(prog: str, fn: Callable[[], Optional[int]]) -> int:
    """Run an argparse script's body; return its exit status (errors as ``prog: error: message`` on stderr)."""
    try:
        return int(fn() or 0)
    except (UserError, RunError) as err:
        sys.stderr.write(f"{prog}: error: {one_paragraph(err)}\n")
        return err.exit_code
