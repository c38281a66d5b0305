"""Hydra sweeps: the joblib launcher runs jobs in parallel, each in its own directory; the SLURM config composes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_joblib_sweep_runs_each_job_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "mnist_fwdgrad.py", "-m", "hydra/launcher=local_parallel", f"hydra.sweep.dir={sweep}",
           "dataset=digits", "model=logreg", "optimization.max_steps=5", "progress_bar=false", "seed=0,1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 2 and runs[0] != runs[1]
    seeds = sorted(json.loads((r / "metrics.json").read_text())["seed"] for r in runs)
    assert seeds == [0, 1]
    assert "Joblib" in proc.stdout + proc.stderr  # the joblib launcher, not the sequential basic one


@pytest.mark.parametrize("launcher,target", [
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_compose(launcher, target):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("mnist_fwdgrad", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
