"""Learning-rate search with Hydra's Optuna sweeper (configs/hydra/sweeper/lr_search.yaml): the task returns the
held-out loss to the sweeper, the learning rates are drawn log-uniformly, and the best trial is reported."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fwdgrad.app.cli import hydra_task, objective_value
from fwdgrad.errors import ConfigError, RunError

ROOT = Path(__file__).resolve().parents[1]


def test_lr_search_config_composes_with_its_objective_and_log_range():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("mnist_fwdgrad", overrides=["hydra/sweeper=lr_search"], return_hydra_config=True)
    assert cfg.objective == "final_test_loss"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "minimize" and sweeper.sampler.seed == 0
    assert sweeper.params["optimization.learning_rate"] == "tag(log, interval(1e-6, 1.0))"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        assert "objective" not in compose("mnist_fwdgrad")  # plain runs return their metrics dict


def test_objective_value_picks_the_metric_and_reports_failures_as_inf():
    cfg = OmegaConf.create({"objective": "final_test_loss"})
    assert objective_value(cfg, {"final_test_loss": 0.25, "steps": 3}) == 0.25
    assert objective_value(cfg, {"final_test_loss": None}) == math.inf  # a non-finite loss is stored as null
    with pytest.raises(ConfigError, match="objective='final_test_loss' is not a result.*returns: steps"):
        objective_value(cfg, {"steps": 3, "stopped": "completed"})

    @hydra_task
    def task(c):
        return {"final_test_loss": 1.5}

    assert task(cfg) == 1.5
    assert task(OmegaConf.create({})) == {"final_test_loss": 1.5}


def test_a_failed_trial_in_a_sweep_counts_as_inf(monkeypatch):
    import fwdgrad.app.cli as cli

    monkeypatch.setattr(cli, "_in_multirun", lambda: True)

    @hydra_task
    def diverged(c):
        raise RunError("training stopped: the loss became nan")

    assert diverged(OmegaConf.create({"objective": "final_test_loss"})) == math.inf
    assert diverged(OmegaConf.create({})) is None


@pytest.mark.slow
def test_a_tiny_study_runs_log_spaced_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "lr"
    cmd = [sys.executable, "mnist_fwdgrad.py", "-m", "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=2",
           f"hydra.sweep.dir={sweep}", "dataset=digits", "model=logreg", "optimization.max_steps=4",
           "progress_bar=false", "plot_misclassified=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    runs = sorted((p.parent for p in sweep.rglob("metrics.json")), key=lambda p: int(p.name.split("_")[0]))
    assert len(runs) == 2
    lrs = [OmegaConf.load(r / ".hydra" / "config.yaml").optimization.learning_rate for r in runs]
    losses = [json.loads((r / "metrics.json").read_text())["final_test_loss"] for r in runs]
    # the same draws as Optuna's TPE sampler (seed 0; random start-up trials) from LogUniform(1e-6, 1)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    dist = optuna.distributions.LogUniformDistribution(1e-6, 1.0)
    expected = [study.ask({"optimization.learning_rate": dist}).params["optimization.learning_rate"] for _ in range(2)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    i = min(range(2), key=lambda j: losses[j])
    assert best.best_value == pytest.approx(losses[i], rel=1e-12)
    assert best.best_params["optimization.learning_rate"] == pytest.approx(lrs[i], rel=1e-12)
    assert "Best parameters" in out and "Best value" in out


@pytest.mark.parametrize("space,message", [
    ("tag(log, interval(1e-1, 1e-3))", "empty or inverted"),
    ("tag(log, interval(-1e-3, 1e-1))", "needs bounds > 0"),
    ("tag(log, interval(0, 1e-1))", "needs bounds > 0"),
    ("interval(0.5, 0.5)", "empty or inverted"),
    ("interval(2, -2)", "empty or inverted"),
])
def test_a_bad_search_interval_is_refused(space, message):
    from fwdgrad.app.cli import check_search_intervals

    on_command_line = OmegaConf.create({"hydra": {"overrides": {"task": [f"optimization.learning_rate={space}"]}}})
    in_the_config = OmegaConf.create({"hydra": {"sweeper": {"params": {"optimization.learning_rate": space}}}})
    for cfg in (on_command_line, in_the_config):
        with pytest.raises(ConfigError, match=message):
            check_search_intervals(cfg)
    check_search_intervals(OmegaConf.create({"hydra": {"sweeper": {"params": {  # a good one passes
        "optimization.learning_rate": "tag(log, interval(1e-6, 1.0))"}}}}))


def test_a_bad_search_interval_ends_the_script_before_optuna_starts(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "mnist_fwdgrad.py"), "-m", "hydra/sweeper=lr_search",
                           "optimization.learning_rate=tag(log, interval(1e-1, 1e-3))", "dataset=digits"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "empty or inverted" in errors[0] and "optimization.learning_rate" in errors[0]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))
