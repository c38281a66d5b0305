"""frog's experiment grids as configs (experiment/frog_fc, experiment/frog_math): every method file composes with
its script and picks frog's published learning rate for its cell; each grid runs as one -m sweep that compare.py
tabulates; global_optim's early stopping and frog's start points."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from fwdgrad.experiments.compare.runs import compare_runs
from fwdgrad.estimators import Backprop, ForwardGradient
from fwdgrad.experiments.global_optim.functions import Rosenbrock, Sphere, StyblinskiTang
from fwdgrad.experiments.global_optim.optimize import optimise, run_global_optim
from mnist_helpers import CONFIGS, ROOT, compose_cfg

METHODS = {"bp": (None, None), "fg_k1": (1, "mean"), "fg_k2": (2, "mean"), "fg_k4": (4, "mean"),
           "fg_k16": (16, "mean"), "frog_k2": (2, "projection"), "frog_k4": (4, "projection"),
           "frog_k16": (16, "projection")}
#: a few cells of frog's lrs/fc_nns.csv and lrs/math.csv, copied from the published files
FC_LRS = {("bp", 256): 0.026050732201274525, ("fg_k4", 1024): 0.0007909307957216181,
          ("frog_k16", 4096): 0.2517256837472351, ("fg_k1", 4096): 7.060228314330062e-05}
MATH_LRS = {("fg_k1", "rosenbrock", 64): 8.560030382057355e-05, ("frog_k4", "styblinski_tang", 64): 0.0088962178664121,
            ("bp", "sphere", 1024): 0.3316314789064596, ("fg_k16", "sphere", 2): 0.2918023676179201}


def test_each_grid_has_the_eight_methods():
    for grid in ("frog_fc", "frog_math"):
        assert sorted(p.stem for p in (CONFIGS / "experiment" / grid).glob("[!_]*.yaml")) == sorted(METHODS)


def _check_estimator(cfg, method: str, grid: str = "frog_fc") -> None:
    est = instantiate(cfg.gradient)
    k, agg = METHODS[method]
    if grid == "frog_math" and agg == "projection":
        agg = "orthogonal_projection"  # frog's rule for k > n, needed at n < 16
    if k is None:
        assert isinstance(est, Backprop)
    else:
        assert isinstance(est, ForwardGradient) and (est.num_tangents, est.aggregation) == (k, agg)
        assert est.distribution == "normal"


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("width", [256, 1024, 4096])
def test_fc_cells_compose_with_frogs_setup_and_learning_rate(method, width):
    cfg = compose_cfg("mnist_fwdgrad", [f"+experiment=frog_fc/{method}", f"frog_fc.width={width}"])
    _check_estimator(cfg, method)
    if (method, width) in FC_LRS:
        assert cfg.optimization.learning_rate == FC_LRS[(method, width)]
    assert cfg.optimization.learning_rate == cfg.frog_fc.lr[method][width]
    assert cfg.optimization.optimizer._target_ == "torch.optim.SGD" and cfg.optimization.optimizer.momentum == 0
    assert cfg.optimization.scheduler._target_ == "torch.optim.lr_scheduler.ConstantLR"
    assert cfg.dataset._target_ == "fwdgrad.experiments.data.mnist" and cfg.dataset.batch_size == 64
    model = instantiate(cfg.model, input_shape=[1, 28, 28], num_classes=10, _convert_="all")
    w = width
    assert sum(p.numel() for p in model.parameters()) == 784 * w + w + w * w + w + w * 10 + 10


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("function,cls,iterations,start",
                         [("sphere", Sphere, 1000, (-1.0, -1.0)), ("rosenbrock", Rosenbrock, 25000, (-1.0, 0.0)),
                          ("styblinski_tang", StyblinskiTang, 1000, (0.0, 0.0))])
def test_math_cells_compose_with_frogs_setup_and_learning_rate(method, function, cls, iterations, start):
    dim = 64
    cfg = compose_cfg("global_optim", [f"+experiment=frog_math/{method}", f"frog_math.function={function}",
                                       f"frog_math.dim={dim}"])
    _check_estimator(cfg, method, "frog_math")
    f = instantiate(cfg.function)
    assert isinstance(f, cls) and f.dim == dim
    assert f.start_point().tolist() == [start[0]] + [start[1]] * (dim - 1)
    assert cfg.iterations == iterations and cfg.early_stopping_patience == 50 and cfg.baseline is None
    assert cfg.optimization.optimizer._target_ == "torch.optim.SGD" and cfg.optimization.optimizer.momentum == 0
    if (method, function, dim) in MATH_LRS:
        assert cfg.optimization.learning_rate == MATH_LRS[(method, function, dim)]
    assert cfg.optimization.learning_rate == cfg.frog_math.lr[method][function][dim]


def test_math_tables_cover_frogs_dimensions():
    cfg = compose_cfg("global_optim", ["+experiment=frog_math/bp"])
    for method in METHODS:
        for function in ("sphere", "rosenbrock", "styblinski_tang"):
            assert list(cfg.frog_math.lr[method][function]) == [2**i for i in range(11)]


def test_a_cell_outside_the_table_names_the_choices():
    cfg = compose_cfg("mnist_fwdgrad", ["+experiment=frog_fc/fg_k4", "frog_fc.width=512"])
    with pytest.raises(InterpolationResolutionError, match="no entry 512; its keys are 256, 1024, 4096"):
        _ = cfg.optimization.learning_rate


# -- global_optim: frog's starts and early stopping ----------------------------------------------------------------
def test_first_and_rest_starts():
    assert Rosenbrock(dim=3, start={"first": -1, "rest": 0}).start == [-1.0, 0.0, 0.0]
    assert Sphere(dim=1, start={"first": 2.0, "rest": 5.0}).start == [2.0]
    with pytest.raises(ValueError, match="needs exactly the keys first and rest"):
        Sphere(dim=2, start={"first": 1.0})


def test_early_stopping_after_patience_steps_without_decrease():
    """A constant f never decreases: the run stops after `patience` steps; f* is never reached on a slope."""
    class Flat(Sphere):
        def __call__(self, x):
            return (x * 0).sum() + 1.0

    f = Flat(dim=2)
    r = optimise(f, Backprop(), f.start_point(), lambda p: torch.optim.SGD(p, lr=0.1), 100, patience=5)
    assert r.early_stopped and r.iterations_run == 5 and r.stop.value == "early_stopping"
    r = optimise(Sphere(dim=2), Backprop(), Sphere(dim=2).start_point(), lambda p: torch.optim.SGD(p, lr=0.1), 20,
                 patience=5)
    assert not r.early_stopped and r.iterations_run == 20 and r.stop.value == "completed"


def test_frog_math_bp_cell_writes_the_run_contract(tmp_path):
    # backprop on the sphere at frog's lr 0.286: x <- 0.43 x, so f underflows to 0 within ~450 steps and then
    # stops decreasing: early stopping ends the run 50 steps later
    cfg = compose_cfg("global_optim", ["+experiment=frog_math/bp", "frog_math.dim=4", "progress=false"])
    summary = run_global_optim(cfg, output_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stopped"] == "early_stopping" and metrics["steps"] < 1000
    assert metrics["final_value"] == 0.0 and metrics["min_value"] == 0.0 and metrics["final_gap"] == 0.0
    assert metrics["estimator"] == {"estimator": "Backprop"} and metrics["function"] == "Sphere"
    (label, run), = summary["estimators"].items()
    assert run["iterations_run"] == metrics["steps"]
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,epoch,wall_time_s,train/loss")
    first = history[1].split(",")
    assert first[0] == "0" and float(first[3]) == pytest.approx(4.0)  # f(-1, -1, -1, -1) - f* = 4
    assert history[-1].split(",")[0] == str(metrics["steps"])


# -- each grid as one -m sweep, tabulated by compare.py --------------------------------------------------------
def _sweep(script: str, sweep: Path, *overrides: str) -> str:
    cmd = [sys.executable, script, "-m", f"hydra.sweep.dir={sweep}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_fc_grid_is_one_sweep_that_compare_tabulates(tmp_path):
    sweep = tmp_path / "fc"
    _sweep("mnist_fwdgrad.py", sweep, "+experiment/frog_fc=glob(*,exclude=_*)", "frog_fc.width=choice(256)",
           "dataset=digits", "dataset.limit_train=64", "dataset.limit_test=64", "optimization.max_steps=1",
           "progress_bar=false", "plot_misclassified=0")
    result = compare_runs([sweep], tmp_path / "cmp")
    assert len(result["runs"]) == 8
    lrs = sorted(r.config["optimization.learning_rate"] for r in result["runs"])
    assert lrs == sorted(compose_cfg("mnist_fwdgrad", ["+experiment=frog_fc/bp"]).frog_fc.lr[m][256] for m in METHODS)
    rows = [line for line in result["table"].splitlines()[2:]]
    assert len(rows) == 8 and "final test acc" in result["table"]
    assert len({r.label for r in result["runs"]}) == 8  # every method is told apart
    assert not any("frog_fc.lr" in key for r in result["runs"] for key in r.label.split())


@pytest.mark.slow
def test_math_grid_is_one_sweep_that_compare_tabulates(tmp_path):
    sweep = tmp_path / "math"
    # three of the eight methods (every cell's composition is checked in-process above; the fc sweep runs all)
    _sweep("global_optim.py", sweep, "+experiment/frog_math=bp,fg_k4,frog_k4", "frog_math.function=choice(sphere)",
           "frog_math.dim=choice(8)", "iterations=40", "progress=false")
    result = compare_runs([sweep], tmp_path / "cmp")
    assert len(result["runs"]) == 3
    header = result["table"].splitlines()[0]
    assert "final f(x)" in header and "final f(x) - f*" in header and "final test acc" not in header
    for r in result["runs"]:
        m = r.metrics
        assert m["steps"] <= 40 and math.isfinite(m["final_value"]) and m["dim"] == 8
        assert m["final_gap"] == pytest.approx(m["final_value"] - m["min_value"])
        assert OmegaConf.load(r.path / ".hydra" / "config.yaml").baseline is None
