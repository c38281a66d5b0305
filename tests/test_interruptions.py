"""Runs that end badly say so and keep what they did (issue 15): real signals sent to a real training process.

SIGINT/SIGTERM: exit status 128 + the signal, ``metrics.json`` with ``stopped="interrupted"``, the log says so,
``model.pt`` is the last finished epoch's (and can be resumed), ``compare.py`` reads the run. SIGKILL: nothing
can be written at the end, but ``run.json`` (written at the start) makes ``compare.py`` list the run as
unfinished. Data-parallel: the launcher forwards the signal and the workers stop together; a killed worker
makes the run exit 1 with one paragraph. ``resume=`` continues an interrupted run to the very weights of a run
that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fwdgrad.experiments.compare.runs import find_run_dirs, load_run, main as compare_main
from fwdgrad.app.cli import RunDirGuard
from fwdgrad.errors import ConfigError, RunDirError
from fwdgrad.experiments.training import loop, train
from fwdgrad.experiments.training.resume import load_resume
from fwdgrad.experiments.training.signals import StopSignals
from mnist_helpers import ROOT, TINY, compose_cfg, read_metrics

#: A run long enough to be interrupted (digits, 23 steps per epoch, a small MLP: a fraction of a second per epoch).
LONG_RUN = ("dataset=digits", "model.hidden_sizes=[32]", "optimization.epochs=400", "progress_bar=false",
            "plot_misclassified=0", "log_every=5")
STEPS_PER_EPOCH = 23


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "mnist_fwdgrad.py"), *LONG_RUN, *extra,
                             f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(run_dir: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    log = run_dir / "mnist_fwdgrad.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {text!r}: {proc.stdout.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{text!r} did not appear in {log} within {timeout} s")


def _workers(pid: int) -> list[int]:
    """The spawned data-parallel workers of process ``pid`` (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _check_interrupted_files(run_dir: Path, signame: str) -> dict:
    metrics = read_metrics(run_dir)
    assert metrics["stopped"] == "interrupted" and metrics["stop_signal"] == signame
    assert f"interrupted by {signame}" in metrics["stop_detail"]
    assert metrics["epochs_completed"] >= 1 and metrics["steps"] >= metrics["epochs_completed"] * STEPS_PER_EPOCH
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    log = (run_dir / "mnist_fwdgrad.log").read_text()
    assert f"interrupted by {signame}" in log and "[WARNING]" in log
    # the checkpoint is the last finished epoch's, whole, and can be continued
    ckpt = torch.load(run_dir / "model.pt", weights_only=False)
    assert ckpt["epoch"] == metrics["epochs_completed"] and ckpt["step"] == ckpt["epoch"] * STEPS_PER_EPOCH
    assert load_resume(run_dir).step == ckpt["step"]
    # compare.py reads it, and says it did not complete
    run = load_run(run_dir)
    assert run.metrics["stopped"] == "interrupted"
    return metrics


# SIGTERM to a real process: the data-parallel test below (a launcher's SIGTERM, exit 143, the same files) and the
# resume tests (a single process, in process); one script run per signal would cost ~8 s of CPU each.
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_its_files_written(sig, status, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(run_dir, "epoch 1/", proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, output[-2000:]
    assert "Traceback" not in output
    _check_interrupted_files(run_dir, signal.Signals(sig).name)
    out = tmp_path / "cmp"
    assert compare_main([str(run_dir), "--out", str(out)]) == 0
    assert "interrupted" in (out / "comparison.md").read_text()


def test_a_killed_run_is_listed_as_unfinished(tmp_path: Path, capsys):
    finished = tmp_path / "runs" / "finished"
    cfg = compose_cfg("mnist_fwdgrad", [*TINY, "model=logreg", "optimization.max_steps=3"])
    train(cfg, finished)
    (finished / ".hydra").mkdir()
    OmegaConf.save(cfg, finished / ".hydra" / "config.yaml")  # as Hydra would have
    killed = tmp_path / "runs" / "killed"
    proc = _start(killed)
    _wait_for(killed, "epoch 2/", proc)  # epoch 1's files are written
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    assert not (killed / "metrics.json").exists()
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert [p.name for p in find_run_dirs([tmp_path / "runs"])] == ["finished", "killed"]
    run = load_run(killed)
    assert run.metrics["stopped"] == "unfinished" and run.metrics["steps"] >= STEPS_PER_EPOCH
    assert "never ended" in run.metrics["stop_detail"]
    out = tmp_path / "cmp"
    assert compare_main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "unfinished" in table and "killed" in table and "finished" in table


@pytest.mark.slow
def test_data_parallel_workers_stop_together_on_a_signal_to_the_launcher(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "distributed.world_size=2", "distributed.timeout_s=60")
    _wait_for(run_dir, "epoch 1/", proc)  # rank 0's epoch lines reach the log
    workers = _workers(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it forwards it
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, output[-2000:]
    assert "epoch 1/400" in output  # ... and the console
    metrics = _check_interrupted_files(run_dir, "SIGTERM")
    # the ranks agreed at a window's end: windows close every log_every (5) steps and at the end of each epoch
    steps = metrics["steps"]
    assert metrics["world_size"] == 2 and (steps % 5 == 0 or steps % STEPS_PER_EPOCH == 0), steps
    assert not any(Path(f"/proc/{w}").exists() for w in workers)


@pytest.mark.slow
def test_a_killed_data_parallel_worker_ends_the_run_with_one_paragraph(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "distributed.world_size=2", "distributed.timeout_s=20")
    _wait_for(run_dir, "epoch 1/", proc)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, output[-2000:]
    assert "Traceback" not in output and "ProcessExitedException" not in output
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "data-parallel worker 1" in line and "killed by SIGKILL" in line
    metrics = read_metrics(run_dir)  # rank 0 noticed at its next all-reduce and wrote what it had
    assert metrics["stopped"] == "worker_lost" and torch.load(run_dir / "model.pt", weights_only=False)["epoch"] >= 1


def test_a_second_interrupt_stops_at_once(monkeypatch, tmp_path: Path):
    """A user who does not want to wait for the step to end presses Ctrl-C again: KeyboardInterrupt where it
    happens, no metrics.json, run.json says so (compare.py lists the run as unfinished). Workers never escalate."""
    real, calls = loop._step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", step)
    cfg = compose_cfg("mnist_fwdgrad", RESUMABLE)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")  # as Hydra would have
    assert not (tmp_path / "run" / "metrics.json").exists()
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "failed" and "KeyboardInterrupt" in status["detail"]
    assert load_run(tmp_path / "run").metrics["stopped"] == "unfinished"
    with StopSignals(escalate=False) as worker:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
    assert worker.received == signal.SIGTERM and worker.count == 2


# -- resume ----------------------------------------------------------------------------------------------------------
#: 320 training digits: 5 steps per epoch, so three short runs (straight, stopped, resumed) cost little.
RESUMABLE = (*TINY, "dataset.limit_train=320", "dataset.limit_test=100", "model=mlp", "model.hidden_sizes=[16]",
             "optimization=adam", "optimization.epochs=3", "gradient.num_tangents=2", "log_every=2")
RESUME_STEPS_PER_EPOCH = 5


def _interrupt_at_step(monkeypatch, n: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to this process during the n-th optimizer step (the loop notices after that step)."""
    real, calls = loop._step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_step", step)


@pytest.fixture(scope="module")
def straight_and_stopped(tmp_path_factory) -> Path:
    """One run of 3 epochs, and the same run interrupted by SIGTERM in its second epoch (at step 8)."""
    root = tmp_path_factory.mktemp("resume")
    train(compose_cfg("mnist_fwdgrad", RESUMABLE), root / "straight")
    with pytest.MonkeyPatch.context() as m:
        _interrupt_at_step(m, 8)
        stopped = train(compose_cfg("mnist_fwdgrad", RESUMABLE), root / "stopped")
    assert stopped["stopped"] == "interrupted" and stopped["steps"] == 8 and stopped["epochs_completed"] == 1
    return root


def test_resume_continues_to_the_weights_of_an_uninterrupted_run(straight_and_stopped: Path, tmp_path: Path):
    root = straight_and_stopped
    cfg = OmegaConf.create(torch.load(root / "stopped" / "model.pt", weights_only=False)["config"])
    cfg.resume = str(root / "stopped")
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed["stopped"] == "completed" and resumed["steps"] == 3 * RESUME_STEPS_PER_EPOCH
    assert resumed["resumed_from"] == str(root / "stopped")
    a, b = (torch.load(d / "model.pt", weights_only=False) for d in (root / "straight", tmp_path / "resumed"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # bit for bit
    for key in ("optimizer", "data_order", "estimator"):
        assert str(a["resume"][key]) == str(b["resume"][key])
    # the history continues the earlier one: same losses and accuracies at the same steps
    columns = ("step", "train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr")
    rows = [[{c: r[c] for c in columns} for r in _history(d)] for d in (root / "straight", tmp_path / "resumed")]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("estimator", [("gradient=zeroth_order", "gradient.num_tangents=2"),
                                       ("gradient=forward_activity", "gradient.num_tangents=2"),
                                       ("gradient=forward_guess", "model.local_losses=true")],
                         ids=["zeroth_order", "forward_activity", "forward_guess"])
def test_resume_continues_every_estimator_exactly(estimator, monkeypatch, tmp_path: Path):
    overrides = (*[o for o in RESUMABLE if not o.startswith("gradient.")], *estimator)
    train(compose_cfg("mnist_fwdgrad", overrides), tmp_path / "straight")
    _interrupt_at_step(monkeypatch, 8)
    assert train(compose_cfg("mnist_fwdgrad", overrides), tmp_path / "stopped")["stopped"] == "interrupted"
    monkeypatch.undo()
    cfg = OmegaConf.create(torch.load(tmp_path / "stopped" / "model.pt", weights_only=False)["config"])
    cfg.resume = str(tmp_path / "stopped")
    assert train(cfg, tmp_path / "resumed")["steps"] == 3 * RESUME_STEPS_PER_EPOCH
    a, b = (torch.load(d / "model.pt", weights_only=False) for d in (tmp_path / "straight", tmp_path / "resumed"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # bit for bit
    assert str(a["resume"]["estimator"]) == str(b["resume"]["estimator"])


def _history(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_refuses_what_it_cannot_continue_exactly(straight_and_stopped: Path, tmp_path: Path):
    stopped = straight_and_stopped / "stopped"
    # a setting that changes what is computed may not change on resume; nothing is written
    cfg = compose_cfg("mnist_fwdgrad", [*RESUMABLE, "optimization.learning_rate=0.5", f"resume={stopped}"])
    with pytest.raises(ConfigError, match="`optimization.learning_rate` differs"):
        train(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
    # checkpoints that cannot be continued exactly (edited copies of the real one)
    ckpt = torch.load(stopped / "model.pt", weights_only=False)
    cases = {
        "there is no .*model.pt": None,
        "not at the end of an epoch": {**ckpt, "resume": {**ckpt["resume"], "at_epoch_end": False}},
        "finished all its 3 epochs": {**ckpt, "epoch": 3},
        "cannot save its random state": {**ckpt, "resume": {**ckpt["resume"], "estimator": None}},
        "holds only the model's weights": {k: v for k, v in ckpt.items() if k != "resume"},
    }
    for i, (message, edited) in enumerate(cases.items()):
        run_dir = tmp_path / f"case{i}"
        run_dir.mkdir()
        if edited is not None:
            torch.save(edited, run_dir / "model.pt")
        with pytest.raises(ConfigError, match=message):
            load_resume(run_dir)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_damaged_checkpoint_is_refused_by_its_checksum(straight_and_stopped: Path, tmp_path: Path, where: float):
    # one flipped bit anywhere in model.pt (header, weights, the config) is caught before anything is loaded
    stopped = straight_and_stopped / "stopped"
    damaged = tmp_path / "damaged"
    shutil.copytree(stopped, damaged)
    data = bytearray((damaged / "model.pt").read_bytes())
    data[int(where * len(data))] ^= 0x10
    (damaged / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match the checksum"):
        load_resume(damaged)
    load_resume(stopped)  # the intact one still resumes


@pytest.mark.parametrize("target", ["same", "inside"])
def test_resuming_into_the_run_being_resumed_is_refused_and_deletes_nothing(straight_and_stopped: Path,
                                                                             tmp_path: Path, target: str, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(straight_and_stopped / "stopped", stopped)
    before = {p.name: p.read_bytes() for p in stopped.iterdir() if p.is_file()}
    out = stopped if target == "same" else stopped / "again"
    cfg = compose_cfg("mnist_fwdgrad", [*RESUMABLE, f"resume={stopped}", "overwrite=true"])
    with pytest.raises(RunDirError, match="run being resumed"):
        train(cfg, out)
    with pytest.raises(SystemExit) as exit_:  # the Hydra callback, before Hydra writes
        RunDirGuard().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(out)}}, "resume": str(stopped),
                                                     "overwrite": True}))
    assert exit_.value.code == 2 and "run being resumed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in stopped.iterdir() if p.is_file()} == before
