"""Every file a training run writes, from one object; each file is replaced atomically (readers never see half).

Figures are not drawn here (see :func:`fwdgrad.experiments.plots.plot_run`): the recorder only writes data files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fwdgrad.experiments.training.run_files import (
    checksum_path,
    CHECKPOINT_FILE,
    HISTORY_COLUMNS,
    HISTORY_FILE,
    METRICS_FILE,
    RUN_STATUS_FILE,
    TB_DIR,
)

__all__ = ["Recorder", "atomic_write"]


def write_checkpoint(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, then its SHA-256 beside it (``<path>.sha256``), which
    :func:`fwdgrad.experiments.training.resume.read_checkpoint` verifies before a checkpoint is used."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    atomic_write(checksum_path(path), lambda f: f.write(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n"))


def atomic_write(path: Path, write: Callable[[io.TextIOBase], None]) -> None:
    """Write via a temporary file and ``os.replace``: readers see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


class Recorder:
    """TensorBoard scalars, ``history.csv``, ``metrics.json``, ``model.pt`` and ``run.json`` of one run.

    ``enabled=False`` makes every method a no-op (for the non-zero ranks of a data-parallel run, where only
    rank 0 writes). :attr:`rows` holds the logged points (the history), e.g. for plotting.
    """

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.rows: List[Dict[str, Any]] = []
        self._writer = None
        self._status: Optional[Dict[str, Any]] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.output_dir / TB_DIR))

    def log(self, step: int, epoch: float, wall_time_s: float, values: Mapping[str, Optional[float]]) -> None:
        """Record one point: TensorBoard scalars and a ``history.csv`` row (written on :meth:`flush`).

        Values logged at a step that already has a row join it (the test metrics at the end of an epoch join
        that step's training row); ``None`` values are left out.
        """
        if not self.enabled:
            return
        if self.rows and self.rows[-1]["step"] == step:
            row = self.rows[-1]
        else:
            row = {"step": step}
            self.rows.append(row)
        row["epoch"] = round(epoch, 4)
        row["wall_time_s"] = round(wall_time_s, 3)
        for tag, value in values.items():
            if value is None:
                continue
            row[tag] = value
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Rewrite ``history.csv`` atomically and flush TensorBoard."""
        if not self.enabled:
            return

        def write(f):
            w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, restval="")
            w.writeheader()
            w.writerows(self.rows)

        atomic_write(self.output_dir / HISTORY_FILE, write)
        self._writer.flush()

    def preload(self, rows: List[Dict[str, Any]]) -> None:
        """Start the history with ``rows`` (a resumed run's earlier points), TensorBoard scalars included."""
        for row in rows:
            values = {k: v for k, v in row.items() if k not in ("step", "epoch", "wall_time_s")}
            self.log(int(row["step"]), row.get("epoch", 0.0), row.get("wall_time_s", 0.0), values)

    def save_checkpoint(self, model: nn.Module, cfg: DictConfig, step: int, epoch: int,
                        extras: Optional[Mapping[str, Any]] = None) -> None:
        """``model.pt``: the model's ``state_dict`` with the resolved config, step and finished epochs, and
        ``extras`` under ``"resume"`` (what :mod:`fwdgrad.experiments.training.resume` needs to continue from here)."""
        if not self.enabled:
            return
        buf = io.BytesIO()
        torch.save(
            {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": OmegaConf.to_container(cfg, resolve=True),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "step": step,
                "epoch": epoch,
                "resume": dict(extras) if extras is not None else None,
            },
            buf,
        )
        write_checkpoint(self.output_dir / CHECKPOINT_FILE, buf.getvalue())

    def write_status(self, status: str, detail: str = "", **info: Any) -> None:
        """``run.json``: ``status`` (``running``, a stop reason, or ``failed``) and ``detail``, with the process
        (pid, host, command line), when it started and when the status last changed; ``info`` is added."""
        if not self.enabled:
            return
        now = datetime.now().isoformat(timespec="seconds")
        if self._status is None:
            self._status = {"pid": os.getpid(), "host": socket.gethostname(), "command": sys.argv, "started": now}
        self._status.update(info, status=status, detail=detail, updated=now)
        atomic_write(self.output_dir / RUN_STATUS_FILE, lambda f: json.dump(self._status, f, indent=2))

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """``metrics.json`` (callers pass ``None`` for a value that is not finite, so the file is strict JSON)."""
        if self.enabled:
            atomic_write(self.output_dir / METRICS_FILE, lambda f: json.dump(metrics, f, indent=2))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
