"""Every config file composes and instantiates (the real files, shrunk): every option of every group of the MNIST
experiment, every learning-rate schedule (against its formula), every published recipe in experiment/ with the
script it belongs to, and the one optimization/ shape shared by both experiments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fwdgrad.app.config import build_optimizer, build_scheduler
from fwdgrad.experiments.data import DatasetNotFoundError, Splits
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import GradientEstimator
from fwdgrad.experiments.global_optim.functions import Beale, Rosenbrock
from mnist_helpers import CONFIGS, compose_cfg

GROUPS = ("dataset", "model", "optimization", "optimization/scheduler", "gradient")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]
OFFLINE = {"digits", "penguins"}
#: experiment/<name>.yaml -> the scripts (primary configs) it is written for
EXPERIMENTS = {
    "reference_mnist": ("mnist_fwdgrad", "mnist_backprop"),
    "reference_beale": ("global_optim",),
    "beale": ("global_optim",),
    "rosenbrock": ("global_optim",),
}


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert found == set(GROUPS)
    assert {o for g, o in OPTIONS if g == "dataset"} >= {"mnist", "fashion_mnist", "kmnist", "cifar10", "svhn",
                                                          "digits", "penguins"}
    assert {o for g, o in OPTIONS if g == "model"} >= {"mlp", "conv", "logreg", "lenet5", "resnet18", "vit",
                                                        "mlp_mixer"}
    assert {o for g, o in OPTIONS if g == "optimization"} >= {"sgd", "adam"}
    assert {o for g, o in OPTIONS if g == "optimization/scheduler"} == {"exponential", "linear", "cosine",
                                                                        "constant"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_compose_and_instantiate(group: str, option: str, tmp_path: Path):
    cfg = compose_cfg("mnist_fwdgrad", [f"{group}={option}"])
    node = OmegaConf.select(cfg, group.replace("/", "."))
    if group == "dataset":
        if option in OFFLINE:
            splits = instantiate(node)
            assert isinstance(splits, Splits) and splits.name == option
            assert splits.train_x.dtype == torch.float32 and splits.train_y.dtype == torch.int64
            assert splits.train_x.shape[1:] == splits.input_shape
        else:
            # The torchvision sets are not shipped: on an empty root without downloading they must say so.
            node.root = str(tmp_path)
            node.download = False
            with pytest.raises(InstantiationException) as err:
                instantiate(node)
            assert isinstance(err.value.__cause__, DatasetNotFoundError)
            assert str(tmp_path) in str(err.value.__cause__) and "dataset=digits" in str(err.value.__cause__)
    elif group == "model":
        for shape, classes in (((1, 8, 8), 10), ((1, 28, 28), 10), ((3, 32, 32), 10)):
            if option == "lenet5" and shape[1] < 16:  # two valid 5x5 convolutions: refused, with the reason
                with pytest.raises(InstantiationException) as err:
                    instantiate(node, input_shape=list(shape), num_classes=classes, _convert_="all")
                assert isinstance(err.value.__cause__, ConfigError) and "16x16" in str(err.value.__cause__)
                continue
            model = instantiate(node, input_shape=list(shape), num_classes=classes, _convert_="all")
            assert model(torch.zeros(2, *shape)).shape == (2, classes)
    elif group == "optimization":
        params = [torch.nn.Parameter(torch.zeros(3))]
        opt = build_optimizer(node.optimizer, params)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups[0]["lr"] == pytest.approx(node.learning_rate)
        for key in ("epochs", "max_steps", "clip_grad_norm", "stop_loss_threshold", "scheduler"):
            assert key in node
        assert "lr_decay" not in node  # the schedule is optimization/scheduler now
    elif group == "optimization/scheduler":
        _check_schedule(option, cfg.optimization)
    else:
        assert isinstance(instantiate(node), GradientEstimator)


def _check_schedule(option: str, optimization) -> None:
    """Step the scheduler over a 10-step run and compare every learning rate with the schedule's formula (the
    run never steps past its length: cosine annealing would rise again)."""
    total, lr0 = 10, float(optimization.learning_rate)
    opt = build_optimizer(optimization.optimizer, [torch.nn.Parameter(torch.zeros(3))])
    sched = build_scheduler(optimization.scheduler, opt, total_steps=total)
    node = optimization.scheduler
    rates = []
    for _ in range(total + 1):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for t, lr in enumerate(rates):
        if option == "exponential":
            expected = lr0 * node.gamma**t
        elif option == "linear":  # from 1 to end_factor over `total` steps
            expected = lr0 * (1 + (node.end_factor - 1) * t / total)
        elif option == "cosine":  # eta_min + (lr0 - eta_min)(1 + cos(pi t / T)) / 2 over `total` steps
            expected = node.eta_min + (lr0 - node.eta_min) * (1 + math.cos(math.pi * t / total)) / 2
        else:
            expected = lr0
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15), (option, t)


def test_the_two_scripts_differ_only_in_the_estimator():
    fwd = OmegaConf.to_container(compose_cfg("mnist_fwdgrad"), resolve=True)
    bp = OmegaConf.to_container(compose_cfg("mnist_backprop"), resolve=True)
    assert fwd.pop("gradient")["_target_"] == "fwdgrad.ForwardGradient"
    assert bp.pop("gradient")["_target_"] == "fwdgrad.Backprop"
    assert fwd == bp
    assert fwd["dataset"]["_target_"] == "fwdgrad.experiments.data.mnist"
    assert fwd["model"]["hidden_sizes"] == [1024, 1024]
    assert fwd["optimization"]["optimizer"]["_target_"] == "torch.optim.SGD"
    # the reference's per-step decay exp(-1e-4 t), as a scheduler config
    assert fwd["optimization"]["scheduler"]["_target_"] == "torch.optim.lr_scheduler.ExponentialLR"
    assert fwd["optimization"]["scheduler"]["gamma"] == pytest.approx(math.exp(-1e-4), rel=1e-8)
    assert fwd["threads"] is None and fwd["tune_malloc"] == "auto"


def test_both_experiments_share_the_optimization_shape():
    mnist = compose_cfg("mnist_fwdgrad").optimization
    optim = compose_cfg("global_optim").optimization
    for node in (mnist, optim):
        assert node.optimizer._partial_ and node.scheduler._partial_ and "learning_rate" in node
        assert node.optimizer.lr == node.learning_rate
    # global_optim's defaults, in that shape: Adam betas (0.9, 0.95), lr 0.01, linear decay to 1% over the run
    assert optim.optimizer._target_ == "torch.optim.Adam" and list(optim.optimizer.betas) == [0.9, 0.95]
    assert optim.learning_rate == 0.01
    assert optim.scheduler._target_ == "torch.optim.lr_scheduler.LinearLR" and optim.scheduler.end_factor == 0.01
    assert OmegaConf.is_missing(optim.scheduler, "total_iters")  # the run's length, passed at the call site


def test_seed_reaches_the_tangents_and_overrides_compose():
    cfg = compose_cfg("mnist_fwdgrad", [
        "seed=7", "gradient.num_tangents=16", "gradient.aggregation=projection", "gradient.distribution=rademacher",
        "dataset.batch_size=1024", "optimization.learning_rate=5e-4",
    ])
    est = instantiate(cfg.gradient)
    assert est.describe() == {"estimator": "ForwardGradient", "num_tangents": 16, "aggregation": "projection",
                              "distribution": "rademacher", "seed": 7}
    assert instantiate(cfg.optimization.optimizer)([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 5e-4


# -- experiment/: the published recipes --------------------------------------------------------------------------
def test_every_experiment_file_is_assigned_to_its_scripts():
    assert sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")) == sorted(EXPERIMENTS)


@pytest.mark.parametrize("name,script", [(n, s) for n, scripts in EXPERIMENTS.items() for s in scripts])
def test_every_experiment_composes_and_instantiates_with_its_script(name: str, script: str):
    cfg = compose_cfg(script, [f"+experiment={name}"])
    opt = build_optimizer(cfg.optimization.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    total = cfg.iterations if script == "global_optim" else 10
    assert build_scheduler(cfg.optimization.scheduler, opt, total_steps=total) is not None
    assert isinstance(instantiate(cfg.gradient), GradientEstimator)
    if script == "global_optim":
        function = instantiate(cfg.function)
        assert isinstance(function, Rosenbrock if name == "rosenbrock" else Beale)
        assert isinstance(instantiate(cfg.baseline), GradientEstimator)
        if name != "reference_beale":  # this project's published runs are the default settings, made explicit
            assert cfg == compose_cfg(script, [f"function={name}"])
            return
        # orobix/fwdgrad: plain SGD at lr 1e-2, no schedule, 1000 iterations, seed 42, start torch.rand(2)
        assert cfg.optimization.optimizer._target_ == "torch.optim.SGD" and cfg.optimization.optimizer.momentum == 0
        assert opt.param_groups[0]["lr"] == 1e-2 and cfg.iterations == 1000 and cfg.seed == 42
        assert type(build_scheduler(cfg.optimization.scheduler, opt, 1000)).__name__ == "ConstantLR"
        torch.manual_seed(42)
        assert function.start_point(torch.float32).tolist() == torch.rand(2).tolist()
        assert cfg.gradient.num_tangents == 1 and cfg.gradient.distribution == "normal"
    else:
        model = instantiate(cfg.model, input_shape=[1, 28, 28], num_classes=10, _convert_="all")
        assert sum(p.numel() for p in model.parameters()) == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
        # orobix/fwdgrad's MNIST command: batch 1024, SGD lr 5e-4 with its exponential decay, 200 epochs
        assert cfg.dataset._target_ == "fwdgrad.experiments.data.mnist" and cfg.dataset.batch_size == 1024
        assert cfg.dataset.limit_train is None and cfg.dataset.test_set_split is None  # all 60,000 examples
        assert cfg.optimization.optimizer._target_ == "torch.optim.SGD" and opt.param_groups[0]["lr"] == 5e-4
        assert cfg.optimization.epochs == 200 and cfg.optimization.max_steps is None
        assert cfg.optimization.scheduler.gamma == pytest.approx(math.exp(-1e-4), rel=1e-8)
        assert cfg.dataset.normalize == "mnist"  # ToTensor() then Normalize((0.1307,), (0.3081,)), as its loader


@pytest.mark.parametrize("name", ["mnist_fwdgrad", "mnist_backprop", "global_optim"])
def test_sweep_job_names_leave_out_where_and_how_a_run_goes(name: str):
    # a sweep job's directory name lists the overrides that change what is computed; resume=<dir>, threads,
    # the data location and the like would only make names long and runs that compute the same look different
    from hydra import compose, initialize_config_dir

    from mnist_helpers import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"resume", "threads", "dataset.root", "overwrite", "progress_bar", "hydra.run.dir"} <= excluded
