"""SIGINT and SIGTERM as requests to stop at the next step boundary, so that a run ends with its files written.

Without this, Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` wherever the process happens to be and SIGTERM (a
job scheduler's cancel, ``kill``) ends it at once: ``metrics.json`` is never written and ``history.csv`` lacks
the last epoch. Inside :class:`StopSignals` a signal only records itself; the training loop asks
:attr:`StopSignals.received` after every step (in a data-parallel run, all ranks agree at the end of a logging
window), stops, and writes ``metrics.json`` with ``stopped="interrupted"``.

The process a user talks to (a single-process run, or the launcher of local data-parallel workers) *escalates*:
a second signal acts as it normally would (``KeyboardInterrupt`` for SIGINT, termination for SIGTERM), for a
user who does not want to wait for the step to end. Workers never escalate: the same signal often reaches them
twice (from the terminal or the scheduler, and forwarded by their launcher), and that must not kill them.

Handlers can only be installed from the main thread; elsewhere (a run started from a thread) the block runs
with the process's handlers unchanged and :attr:`received` stays ``None``.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional

__all__ = ["STOP_SIGNALS", "StopSignals", "signal_name"]

#: The signals that ask a run to stop (SIGKILL cannot be caught: a killed run is found by its run.json).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: while it is active, SIGINT and SIGTERM set :attr:`received` instead of ending the process.

    Args:
        escalate: whether a second signal acts at once (the process a user talks to), see the module docstring.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.escalate = escalate
        self.received: Optional[int] = None  #: the first signal received, or None
        self.count = 0  #: how many signals were received
        self._previous: Dict[int, Any] = {}

    @property
    def name(self) -> str:
        """The first signal's name (``SIGINT``), or an empty string."""
        return signal_name(self.received) if self.received is not None else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Runs between two bytecodes of the main thread: record only (no logging: the interrupted code may hold
        # the logging lock).
        self.count += 1
        if self.received is None:
            self.received = signum
            return
        if self.escalate:
            self.__exit__()  # the process's own handlers again: this signal and any later one act at once
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
