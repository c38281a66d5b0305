"""Helpers shared by the MNIST-experiment tests: compose the real configs and shrink them."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: Small, fast settings every in-process run starts from (offline data, no progress bar).
TINY = ("dataset=digits", "progress_bar=false", "optimization.epochs=1", "plot_misclassified=0")


def compose_cfg(name: str = "mnist_fwdgrad", overrides: Iterable[str] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with Hydra's override syntax, as the scripts would."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def read_history(run_dir: Path) -> tuple[list[str], list[dict]]:
    with open(run_dir / "history.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    """Write ``arr`` (uint8) in the IDX format: 0, 0, type 0x08, ndim, big-endian int32 sizes, data."""
    payload = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    payload += arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path
