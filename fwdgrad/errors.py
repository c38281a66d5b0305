"""The one error hierarchy of fwdgrad: every error it raises on purpose, and how an entry point exits on it.

::

    FwdgradError                      base; ``exit_code`` is what an entry point exits with
    ├── UserError          (exit 2)   the input cannot work; the message names the fix. Nothing was written.
    │   ├── ConfigError               a bad value or an impossible combination in a config or an argument
    │   │                             (also a ``ValueError``, so plain ``except ValueError`` still catches it)
    │   ├── DatasetError              a dataset cannot be loaded
    │   │   ├── DatasetNotFoundError  its files are missing and could not be downloaded
    │   │   └── CorruptDatasetError   a file exists but cannot be decoded (the message names it)
    │   └── RunDirError               a run directory cannot be used: one given to ``compare.py`` holds no
    │                                 readable run, or a new run's already holds an earlier run's files
    ├── RunError           (exit 1)   the run started and then failed; what it finished is kept
    │   ├── WorkerLostError           a data-parallel worker died or stopped answering
    │   └── Interrupted  (128 + signal number: 130 for SIGINT, 143 for SIGTERM)
    │                                 SIGINT/SIGTERM stopped the run at a step boundary; its files say so
    └── Unsupported                   the fast forward-mode engine has no rule for an op (the estimator falls
                                      back to ``torch.func``, visibly, or raises ConfigError with backend=fast)

Messages are one paragraph: what is wrong, with the offending value or path, and what to change.
"""

from __future__ import annotations

__all__ = [
    "FwdgradError",
    "UserError",
    "ConfigError",
    "DatasetError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "RunDirError",
    "RunError",
    "WorkerLostError",
    "Interrupted",
    "Unsupported",
]


class FwdgradError(Exception):
    """Base of every error fwdgrad raises on purpose."""

    #: The process exit status an entry point uses for this error.
    exit_code: int = 1


class UserError(FwdgradError):
    """The input (config, arguments, data, directories) cannot work; raised before anything is written."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A bad value or an impossible combination in a config or an argument; the message names the fix."""


class DatasetError(UserError):
    """A dataset cannot be loaded; the message says why and what to do."""


class DatasetNotFoundError(DatasetError):
    """The dataset's files are missing and could not be downloaded."""


class CorruptDatasetError(DatasetError):
    """A dataset file exists but cannot be decoded; the message names the file."""


class RunDirError(UserError):
    """A run directory cannot be used: one given for comparison holds no readable run, or the directory of a new
    run already holds an earlier run's files."""


class RunError(FwdgradError, RuntimeError):
    """The run started and then failed; the files of what it finished are kept."""

    exit_code = 1


class WorkerLostError(RunError):
    """A collective failed or timed out: another data-parallel worker died or stopped answering."""


class Interrupted(RunError):
    """SIGINT or SIGTERM stopped the run at a step boundary, after it wrote what it had done.

    The exit status is the shell's convention for a process ended by a signal, ``128 + signal number``, so that
    a job scheduler or a shell loop sees the run as interrupted (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __reduce__(self):  # pickled with its signal (the default would call __init__ with the message only)
        return type(self), (str(self), self.signum)


class Unsupported(FwdgradError, RuntimeError):
    """The fast forward-mode engine met an op on tangent-carrying tensors that it has no rule for."""
