"""The entry scripts as a user runs them (subprocesses): run-dir names, -m multirun, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mnist_helpers import ROOT

QUICK = ["dataset=digits", "model=logreg", "progress_bar=false", "plot_misclassified=0"]


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_multirun_jobs_land_in_separate_named_dirs(tmp_path: Path):
    proc = _run("mnist_fwdgrad.py", ["-m", *QUICK, "optimization.max_steps=2", "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweeps = list((tmp_path / "outputs" / "mnist_fwdgrad").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.endswith("_multirun")
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    assert "seed=0" in jobs[0].name and "seed=1" in jobs[1].name
    seeds = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["stopped"] == "max_steps"
        seeds.add(metrics["estimator"]["seed"])  # gradient.seed follows the top-level seed
        assert (job / "tb").is_dir() and (job / "history.csv").is_file() and (job / "model.pt").is_file()
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "mnist_fwdgrad.log").is_file()
    assert seeds == {0, 1}


def test_missing_dataset_offline_exits_with_one_message(tmp_path: Path):
    empty = tmp_path / "no_data"
    empty.mkdir()
    proc = _run("mnist_backprop.py", [f"dataset.root={empty}", "dataset.download=false"], tmp_path)
    assert proc.returncode == 2  # a data error
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    message = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(message) == 1
    assert str(empty / "MNIST" / "raw") in message[0] and "t10k-images-idx3-ubyte" in message[0]
    assert "dataset=digits" in message[0]
    # The run directory is under the script's name, so backprop and fwdgrad runs are told apart.
    (run_dir,) = (tmp_path / "outputs" / "mnist_backprop").iterdir()
    assert (run_dir / "mnist_backprop.log").is_file()


def test_non_finite_loss_exits_non_zero_after_writing(tmp_path: Path):
    run_dir = tmp_path / "run"
    quick = [o for o in QUICK if not o.startswith("model=")]
    proc = _run("mnist_backprop.py", [*quick, "model=mlp", "model.hidden_sizes=[32]", "log_every=1",
                                      "optimization.learning_rate=1e30", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 1  # a failure during the run
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    (message,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "the training loss became" in message and str(run_dir) in message
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "non_finite_loss"
    assert (run_dir / "history.csv").read_text().startswith("step,epoch,wall_time_s,")
