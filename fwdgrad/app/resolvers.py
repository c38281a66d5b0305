"""The OmegaConf resolvers the configs use, registered by the entry points (never on import).

* ``${pid:}``: the process id, for unique run directories (``configs/hydra/default.yaml``). Cached, so a sweep's
  jobs (joblib workers included, which receive the parent's resolver cache) share the sweep directory of the
  process that launched them.
* ``${lookup:table,key}``: ``table[key]``, which the experiment grids use to pick a cell's learning rate from a
  published table.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from fwdgrad.errors import ConfigError

__all__ = ["lookup", "register_resolvers"]


def lookup(table: Any, key: Any) -> Any:
    """``${lookup:${some.table},${some.key}}``: ``table[key]``, for the per-cell values of an experiment grid
    (e.g. a published learning rate per network width). Integer keys match their text and vice versa."""
    for candidate in (key, str(key), int(key) if str(key).lstrip("-").isdigit() else None):
        if candidate is not None and candidate in table:
            return table[candidate]
    raise ConfigError(f"${{lookup:...}}: the table has no entry {key!r}; its keys are {', '.join(map(str, table))}. "
                      "Choose one of them, or set the looked-up value directly on the command line.")


def register_resolvers() -> None:
    """Register ``pid`` and ``lookup`` with OmegaConf (a process-wide registry), once; later calls do nothing."""
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)
    if not OmegaConf.has_resolver("lookup"):
        OmegaConf.register_new_resolver("lookup", lookup)
