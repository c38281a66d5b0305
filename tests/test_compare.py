"""Run comparison on synthetic run directories written exactly to the training loop's contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwdgrad.experiments.compare.runs import (
    RunDirError,
    curve,
    default_run_dirs,
    find_run_dirs,
    flatten_config,
    label_runs,
    load_run,
    main,
)

ROOT = Path(__file__).resolve().parents[1]

FORWARD = """\
  _target_: fwdgrad.ForwardGradient
  num_tangents: {k}
  aggregation: mean
  distribution: normal
  seed: ${{seed}}"""
BACKPROP = """\
  _target_: fwdgrad.Backprop"""
CONFIG = """\
gradient:
{gradient}
optimization:
  learning_rate: {lr}
  optimizer: sgd
  epochs: 1
  batch_size: 64
dataset:
  name: mnist
  root: /data/mnist
model:
  _target_: fwdgrad.nn.models.MLP
  hidden_sizes:
  - 128
  activation: relu
seed: 0
"""
HISTORY_HEADER = "step,epoch,wall_time_s,train/loss,train/accuracy,test/loss,test/accuracy,lr,time/step_ms"


def make_run(path: Path, *, k: int | None = 1, lr: float = 0.001, acc: float = 0.9, peak=None,
             stopped=None, steps: int = 40) -> Path:
    """A finished run as mnist_fwdgrad.py / mnist_backprop.py write it (k=None: backprop)."""
    (path / ".hydra").mkdir(parents=True)
    gradient = BACKPROP if k is None else FORWARD.format(k=k)
    (path / ".hydra" / "config.yaml").write_text(CONFIG.format(gradient=gradient, lr=lr))
    estimator = ({"estimator": "Backprop"} if k is None else
                 {"estimator": "ForwardGradient", "num_tangents": k, "aggregation": "mean",
                  "distribution": "normal", "seed": 0})
    metrics = {
        "final_test_accuracy": acc, "best_test_accuracy": acc + 0.01, "final_test_loss": 0.3,
        "final_train_loss": 0.25, "steps": steps, "epochs_completed": 1, "wall_time_s": 12.5,
        "step_time_ms": 3.25, "peak_memory_mb": peak, "stopped": stopped, "estimator": estimator,
        "dataset": "mnist", "model": "MLP", "device": "cpu",
    }
    (path / "metrics.json").write_text(json.dumps(metrics))
    rows = [HISTORY_HEADER]
    for step in range(1, steps + 1):
        loss = 2.3 / (1 + 0.05 * step * lr * 1000)
        test = f"{loss + 0.05:.4f},{acc * step / steps:.4f}" if step % 10 == 0 else ","  # evaluations only
        rows.append(f"{step},0,{step * 0.3:.2f},{loss:.4f},{0.5:.2f},{test},{lr},3.2")
    (path / "history.csv").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A -m sweep of 3 runs differing in k and lr."""
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    for i, (k, lr, acc) in enumerate([(1, 0.001, 0.81), (4, 0.001, 0.86), (4, 0.01, 0.9)]):
        make_run(root / str(i), k=k, lr=lr, acc=acc)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_sweep_runs_labelled_by_what_differs_table_and_figure(sweep, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "comparison.md").read_text()
    labels = ["k=1 lr=0.001", "k=4 lr=0.001", "k=4 lr=0.01"]
    rows = [line for line in md.splitlines() if line.startswith("| k=")]
    assert [r.split(" | ")[0] for r in rows] == [f"| {lab}" for lab in labels]  # sweep order kept
    assert "| k=4 lr=0.01 | 0.9000 | 0.9100 | 0.2500 | 40 | 1 | 3.25 | 12.5 | n/a | ForwardGradient (" in md
    assert "num_tangents=4, aggregation=mean, distribution=normal, seed=0" in md
    assert "`gradient.num_tangents`, `optimization.learning_rate`" in md
    assert "0/" not in rows[0].split(" | ")[0]  # directory names are not labels
    for lab in labels:
        assert lab in printed
    assert (out / "comparison.png").stat().st_size > 20_000


def test_forward_vs_backprop_labels_name_the_estimator(tmp_path):
    runs = [load_run(make_run(tmp_path / "fwd", k=1)), load_run(make_run(tmp_path / "bp", k=None, peak=512.0))]
    assert label_runs(runs) == ["gradient=ForwardGradient k=1 agg=mean tangents=normal", "gradient=Backprop"]


def test_other_differing_keys_get_short_unique_names(tmp_path):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    cfg = (b / ".hydra" / "config.yaml").read_text()
    (b / ".hydra" / "config.yaml").write_text(cfg.replace("  - 128", "  - 256\n  - 128").replace("seed: 0\n", "seed: 3\n"))
    assert label_runs([load_run(a), load_run(b)]) == ["hidden_sizes=[128] seed=0", "hidden_sizes=[256,128] seed=3"]


def test_identical_configs_are_told_apart_by_directory(tmp_path):
    runs = [load_run(make_run(tmp_path / "first")), load_run(make_run(tmp_path / "second"))]
    label = "ForwardGradient (num_tangents=1, aggregation=mean, distribution=normal, seed=0)"
    assert label_runs(runs) == [f"{label} (first)", f"{label} (second)"]


def test_interpolation_copies_are_not_differences_but_resolved_values_are():
    flat = flatten_config({"seed": 1, "gradient": {"seed": "${seed}", "name": "run-${seed}"},
                           "path": "${hydra:runtime.output_dir}"})
    assert flat == {"seed": 1, "gradient.name": "run-1", "path": "${hydra:runtime.output_dir}"}


def test_sweep_jobs_in_numeric_order_and_duplicates_once(tmp_path):
    root = tmp_path / "sweep"
    for i in (0, 1, 2, 10, 11):
        make_run(root / str(i), k=i + 1, steps=2)
    found = find_run_dirs([root, root / "10"])
    assert [p.name for p in found] == ["0", "1", "2", "10", "11"]


def test_sweep_jobs_in_numeric_order_when_the_name_goes_on_after_the_number(tmp_path):
    # Hydra's "<num>_<overrides>", nested when an override names a config group path (+experiment/frog_fc=bp)
    root = tmp_path / "sweep"
    for i in (0, 2, 10):
        make_run(root / f"{i}_+experiment" / f"frog_fc=m{i},lr=0.{i}", k=i + 1, steps=2)
    assert [p.parent.name for p in find_run_dirs([root])] == ["0_+experiment", "2_+experiment", "10_+experiment"]


def test_history_empty_cells_are_skipped_per_curve(tmp_path):
    run = load_run(make_run(tmp_path / "r", steps=40))
    acc = curve(run, "step", "test/accuracy")
    assert list(acc["step"]) == [10, 20, 30, 40]
    assert len(curve(run, "wall_time_s", "train/loss")) == 40
    assert curve(run, "step", "no/such/column").empty


def test_default_picks_newest_forward_and_newest_backprop(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = make_run(tmp_path / "outputs" / "mnist" / "2026-01-01_10-00-00_fwd", k=1)
    bp = make_run(tmp_path / "outputs" / "mnist" / "2026-01-01_10-05-00_backprop", k=None)
    new = make_run(tmp_path / "outputs" / "mnist" / "2026-01-01_11-00-00_fwd", k=8)
    now = time.time()
    for i, run in enumerate((old, bp, new)):
        os.utime(run / "metrics.json", (now + i, now + i))
    assert default_run_dirs() == [bp.resolve(), new.resolve()]  # sorted by estimator target
    assert main([]) == 0
    (out,) = (tmp_path / "outputs" / "compare").iterdir()
    md = (out / "comparison.md").read_text()
    assert "| gradient=Backprop |" in md and "| gradient=ForwardGradient k=8 agg=mean tangents=normal |" in md
    assert "k=1" not in md


@pytest.mark.parametrize("case", ["empty", "missing", "no_runs_at_all"])
def test_no_run_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "history.csv").write_text(HISTORY_HEADER + "\n")  # interrupted run
    args = {"empty": ["empty"], "missing": ["nowhere"], "no_runs_at_all": []}[case]
    assert main([*args, "--out", "cmp"]) == 2
    err = capsys.readouterr().err
    expected = {"empty": "empty holds no run", "missing": "nowhere does not exist",
                "no_runs_at_all": "no finished run found under outputs/"}[case]
    assert expected in err and "metrics.json" in err and err.count("\n") == 1
    assert not (tmp_path / "cmp").exists()


def test_bad_metrics_and_missing_config_name_the_file(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "metrics.json").write_text("{\"final_test_accuracy\": 0.9,")
    with pytest.raises(RunDirError, match="metrics.json is not valid JSON"):
        load_run(run)
    other = make_run(tmp_path / "s")
    (other / ".hydra" / "config.yaml").unlink()
    with pytest.raises(RunDirError, match="no .hydra/config.yaml"):
        load_run(other)


def test_command_line_error_has_no_traceback(tmp_path):
    (tmp_path / "nothing").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(tmp_path / "nothing")], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "holds no run" in proc.stderr and "Traceback" not in proc.stderr


def test_stopped_column_only_when_a_run_stopped(tmp_path):
    from fwdgrad.experiments.compare.runs import markdown_table

    runs = [load_run(make_run(tmp_path / "a", k=1)), load_run(make_run(tmp_path / "b", k=2))]
    label_runs(runs)
    assert "| stopped |" not in markdown_table(runs)
    runs.append(load_run(make_run(tmp_path / "c", k=3, stopped="diverged: loss is nan")))
    label_runs(runs)
    table = markdown_table(runs)
    assert "| stopped |" in table and "| diverged: loss is nan |" in table


def test_flatten_skips_run_time_only_missing_values():
    # Real run configs keep `???` for sizes known only at run time (model.input_shape): not an error.
    from omegaconf import OmegaConf

    from fwdgrad.experiments.compare.runs import flatten_config

    flat = flatten_config(OmegaConf.create({"model": {"input_shape": "???", "hidden": [4]}, "seed": 1}))
    assert flat == {"model.hidden": [4], "seed": 1}
