"""The OmegaConf resolvers the configs use, registered by the entry points (never on import).

* ``${pid:}``: the process id, for unique run directories (``configs/hydra/default.yaml``). Cached, so a sweep's
  jobs (joblib workers included, which receive the parent's resolver cache) share the sweep directory of the
  process that launched them.
* ``${lookup:table,key}``: ``table[key]``, which the experiment grids use to pick a cell's learning rate from a
  published table.
* ``${run_stamp:}``: the unique part of a default run directory, ``<date>_<time>-<microseconds>-<pid>``; under
  torchrun, where every rank composes its own config, one stamp for all the ranks of the job (the launching
  agent's start time and process id), so that a multi-process run writes one run directory.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from fwdgrad.errors import ConfigError

__all__ = ["lookup", "register_resolvers", "run_stamp", "torchrun_agent"]


def lookup(table: Any, key: Any) -> Any:
    """``${lookup:${some.table},${some.key}}``: ``table[key]``, for the per-cell values of an experiment grid
    (e.g. a published learning rate per network width). Integer keys match their text and vice versa."""
    for candidate in (key, str(key), int(key) if str(key).lstrip("-").isdigit() else None):
        if candidate is not None and candidate in table:
            return table[candidate]
    raise ConfigError(f"${{lookup:...}}: the table has no entry {key!r}; its keys are {', '.join(map(str, table))}. "
                      "Choose one of them, or set the looked-up value directly on the command line.")


def torchrun_agent() -> Optional[int]:
    """The process id of the torchrun agent that started this process (its parent), or None outside torchrun."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ else None


def _started(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch, Linux /proc), or None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_stamp() -> str:
    """``${run_stamp:}`` (module docstring)."""
    agent = torchrun_agent()
    if agent is None:
        return f"{datetime.now():%Y-%m-%d_%H-%M-%S-%f}-{os.getpid()}"
    started = _started(agent)
    when = datetime.fromtimestamp(started) if started is not None else datetime.now().replace(hour=0, minute=0,
                                                                                             second=0)
    return f"{when:%Y-%m-%d_%H-%M-%S}-torchrun-{agent}"


def register_resolvers() -> None:
    """Register ``pid``, ``run_stamp`` and ``lookup`` with OmegaConf (a process-wide registry), once; later calls
    do nothing."""
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)
    if not OmegaConf.has_resolver("run_stamp"):  # cached: a sweep's jobs share their launcher's stamp
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    if not OmegaConf.has_resolver("lookup"):
        OmegaConf.register_new_resolver("lookup", lookup)
