"""A run never mixes with an earlier one in the same directory (issue 15, item 3), and compare.py tells a run that
never finished from one that did.

Before: a second run into an existing run directory rewrote ``.hydra/config.yaml`` and, when it failed or was
interrupted, left the earlier ``metrics.json``, which ``compare.py`` then reported under the new configuration.
Now a directory that holds files is refused before anything is written (exit status 2), unless ``overwrite=true``,
which deletes the earlier run's own files (never other files). Two runs started in the same second get their own
default directories: ``tests/test_entry_points.py::test_two_runs_started_together_get_their_own_directories``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fwdgrad.app.cli import RunDirGuard
from fwdgrad.experiments.compare.runs import load_run
from fwdgrad.errors import RunDirError
from fwdgrad.experiments.global_optim.optimize import run_global_optim
from fwdgrad.app.rundir import RUN_ENTRIES, claim_run_dir
from fwdgrad.experiments.training import train
from mnist_helpers import ROOT, TINY, compose_cfg, read_metrics

QUICK = (*TINY, "model=logreg", "optimization.max_steps=2")


def _earlier_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"final_test_accuracy": 0.99}')
    (run_dir / "history.csv").write_text("step\n")


def test_the_api_refuses_a_directory_with_an_earlier_run(tmp_path: Path):
    _earlier_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds files .*metrics.json.*overwrite=true"):
        train(compose_cfg("mnist_fwdgrad", QUICK), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"final_test_accuracy": 0.99}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["history.csv", "metrics.json"]


def test_overwrite_deletes_the_earlier_runs_files_first(tmp_path: Path):
    _earlier_run(tmp_path / "run")
    (tmp_path / "run" / "plots.png.tmp").write_text("a leftover of an interrupted atomic write")
    metrics = train(compose_cfg("mnist_fwdgrad", [*QUICK, "overwrite=true"]), tmp_path / "run")
    assert read_metrics(tmp_path / "run")["steps"] == metrics["steps"] == 2
    assert not (tmp_path / "run" / "plots.png.tmp").exists()


def test_overwrite_never_deletes_files_no_run_wrote(tmp_path: Path):
    _earlier_run(tmp_path / "run")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt, which no fwdgrad run wrote"):
        claim_run_dir(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and (tmp_path / "run" / "metrics.json").exists()


def test_a_sweeps_job_folders_count_as_an_earlier_run(tmp_path: Path):
    sweep = tmp_path / "sweep"
    for job in ("0_seed=0", "1_seed=1"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / "summary.json").write_text("{}")
        (sweep / job / "global_optim.log").write_text("")
    (sweep / "multirun.yaml").write_text("")
    with pytest.raises(RunDirError):
        claim_run_dir(sweep)
    claim_run_dir(sweep, overwrite=True)
    assert not any(sweep.iterdir())


def _script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_script_refuses_an_earlier_run_directory_before_hydra_writes_into_it(tmp_path: Path):
    run_dir = tmp_path / "run"
    earlier = compose_cfg("global_optim", ["iterations=5", "progress=false"])
    run_global_optim(earlier, run_dir)  # the earlier run, with the files Hydra writes beside it
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(earlier, run_dir / ".hydra" / "config.yaml")
    (run_dir / "global_optim.log").write_text("the earlier run's log\n")
    config_before = (run_dir / ".hydra" / "config.yaml").read_text()
    summary_before = (run_dir / "summary.json").read_text()

    second = _script("global_optim.py", "iterations=7", "progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    output = second.stdout + second.stderr
    assert second.returncode == 2 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert f"the run directory {run_dir} already holds files" in line and "overwrite=true" in line
    # the earlier run is untouched, its config included (Hydra would have rewritten it)
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config_before
    assert (run_dir / "summary.json").read_text() == summary_before

    # overwrite=true: the same callback (in process, a script run less) deletes the earlier run's files, the log
    # included, before Hydra writes the new run's (the earlier run's .hydra/config.yaml would otherwise stay)
    RunDirGuard().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}, "overwrite": True}))
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_every_known_run_entry_is_a_file_some_script_writes():
    from fwdgrad.experiments.training import run_files

    training = {run_files.METRICS_FILE, run_files.HISTORY_FILE, run_files.CHECKPOINT_FILE, run_files.PLOTS_FILE,
                run_files.TB_DIR, run_files.RUN_STATUS_FILE}
    assert training <= RUN_ENTRIES
    assert {"summary.json", "loss.png", "trajectories.png", "approx_quality.csv"} <= RUN_ENTRIES


# -- compare.py and runs that never finished -----------------------------------------------------------------------
def _unfinished(run_dir: Path, status: dict) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_cfg("mnist_fwdgrad", QUICK), run_dir / ".hydra" / "config.yaml")
    (run_dir / "run.json").write_text(json.dumps(status))
    (run_dir / "history.csv").write_text("step,train/loss\n20,2.3\n40,2.1\n")


@pytest.mark.parametrize("status,stopped,detail", [
    ({"status": "running", "pid": 2**22 + 12345, "host": socket.gethostname(), "started": "t"}, "unfinished",
     "never ended"),
    ({"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": "t"}, "running",
     "still running"),
    ({"status": "failed", "detail": "RuntimeError: boom", "pid": 1, "host": "elsewhere"}, "unfinished",
     "run.json says failed: RuntimeError: boom"),
])
def test_compare_lists_a_run_without_metrics_as_unfinished(status, stopped, detail, tmp_path: Path):
    _unfinished(tmp_path / "run", status)
    run = load_run(tmp_path / "run")
    assert run.metrics["stopped"] == stopped and detail in run.metrics["stop_detail"]
    assert run.metrics["steps"] == 40  # how far its history got
