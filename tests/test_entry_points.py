"""The one error path of every entry point (fwdgrad.app.cli), the run-directory scheme, and the `threads` key.

Each script runs as a user runs it (a subprocess): a bad value exits with status 2 and one ``[ERROR]`` paragraph
naming it, without a traceback; argparse scripts print ``prog: error: ...`` and exit with status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwdgrad.app.cli import EntryExit, hydra_task, run_cli
from fwdgrad.errors import ConfigError, DatasetError, RunError
from fwdgrad.experiments.training import train
from mnist_helpers import ROOT, TINY, compose_cfg, read_metrics

#: script -> (a bad value, text its message must contain)
BAD_VALUE = {
    "mnist_fwdgrad.py": ("optimization.epochs=0", "optimization.epochs must be an integer >= 1, got 0"),
    "mnist_backprop.py": ("threads=0", "threads must be an integer >= 1, got 0"),
    "global_optim.py": ("optimization.learning_rate=-1", "`optimization.learning_rate` must be a finite number > 0"),
    "approx_quality.py": ("num_samples=1", "num_samples must be >= 2"),
}


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", sorted(BAD_VALUE))
def test_a_bad_value_exits_2_with_one_error_line_and_no_traceback(script: str, tmp_path: Path):
    override, expected = BAD_VALUE[script]
    proc = _run(script, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert expected in line
    log = (tmp_path / "run" / f"{script.removesuffix('.py')}.log").read_text()  # also in <job>.log
    assert expected in log and "[ERROR]" in log


def test_a_config_hydra_cannot_compose_exits_2(tmp_path: Path):
    # Hydra reports an unknown key itself (before the task starts); run_hydra, shared by every script, gives it
    # the status of a config error.
    proc = _run("mnist_fwdgrad.py", "no_such_key=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("script,args,expected", [
    ("compare.py", ["nowhere"], "compare.py: error: nowhere does not exist"),
    ("scripts/bench.py", ["--models", "resnet"], "bench.py: error: unknown model 'resnet'"),
])
def test_argparse_scripts_exit_2_with_one_error_line(script, args, expected, tmp_path: Path):
    proc = _run(script, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1


def test_the_wrapper_maps_each_kind_of_error_to_its_status(caplog):
    def failing(exc):
        @hydra_task
        def task(cfg):
            raise exc
        return task

    for exc, status in ((ConfigError("bad\nvalue"), 2), (DatasetError("no data"), 2), (RunError("lost"), 1),
                        (KeyError("bug"), 1)):
        with pytest.raises(EntryExit) as err:
            failing(exc)(None)
        assert err.value.code == status
    assert "bad value" in caplog.text  # one paragraph: the newline is gone
    assert hydra_task(lambda cfg: {"ok": 1})(None) == {"ok": 1}
    assert run_cli("x", lambda: 0) == 0


def test_two_runs_started_together_get_their_own_directories(tmp_path: Path):
    cmd = [sys.executable, str(ROOT / "global_optim.py"), "iterations=5", "baseline=null", "progress=false"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "outputs" / "global_optim").iterdir())
    assert len(runs) == 2 and all((run / "summary.json").is_file() for run in runs)
    # outputs/<config name>/<date>_<time>-<microseconds>-<pid>
    for run in runs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}-\d+", run.name), run.name


def test_threads_sets_torch_threads_for_the_run_and_restores_them(tmp_path: Path):
    before = torch.get_num_threads()
    cfg = compose_cfg("mnist_backprop", [*TINY, "model=logreg", "optimization.max_steps=2", "threads=1"])
    assert train(cfg, tmp_path)["threads"] == 1
    assert read_metrics(tmp_path)["threads"] == 1
    assert torch.get_num_threads() == before
    cfg = compose_cfg("mnist_backprop", [*TINY, "model=logreg", "optimization.max_steps=2"])
    assert train(cfg, tmp_path / "default")["threads"] == before  # null: torch's default, untouched


def test_a_multirun_goes_on_after_a_job_whose_loss_became_non_finite(tmp_path: Path):
    proc = _run("mnist_backprop.py", "-m", "dataset=digits", "model=mlp", "model.hidden_sizes=[32]",
                "progress_bar=false", "plot_misclassified=0", "log_every=1", "optimization.max_steps=40",
                "optimization.learning_rate=1e30,0.1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-2000:]
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "the training loss became" in line
    stopped = sorted(read_metrics(p.parent)["stopped"] for p in (tmp_path / "sweep").rglob("metrics.json"))
    assert stopped == ["max_steps", "non_finite_loss"]
