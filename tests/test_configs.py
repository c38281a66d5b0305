"""Every config file of the MNIST experiment composes and instantiates (the real files, shrunk)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fwdgrad.data import DatasetNotFoundError, Splits
from fwdgrad.estimators import GradientEstimator
from mnist_helpers import CONFIGS, compose_cfg

GROUPS = ("dataset", "model", "optimization", "gradient")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]
OFFLINE = {"digits", "penguins"}


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert found == set(GROUPS)
    assert {o for g, o in OPTIONS if g == "dataset"} >= {"mnist", "fashion_mnist", "kmnist", "cifar10", "digits",
                                                          "penguins"}
    assert {o for g, o in OPTIONS if g == "model"} >= {"mlp", "conv", "logreg"}
    assert {o for g, o in OPTIONS if g == "optimization"} >= {"sgd", "adam"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_compose_and_instantiate(group: str, option: str, tmp_path: Path):
    cfg = compose_cfg("mnist_fwdgrad", [f"{group}={option}"])
    node = cfg[group]
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
            model = instantiate(node, input_shape=list(shape), num_classes=classes, _convert_="all")
            assert model(torch.zeros(2, *shape)).shape == (2, classes)
    elif group == "optimization":
        params = [torch.nn.Parameter(torch.zeros(3))]
        opt = instantiate(node.optimizer)(params)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups[0]["lr"] == pytest.approx(node.learning_rate)
        for key in ("lr_decay", "epochs", "max_steps", "clip_grad_norm", "stop_loss_threshold"):
            assert key in node
    else:
        assert isinstance(instantiate(node), GradientEstimator)


def test_the_two_scripts_differ_only_in_the_estimator():
    fwd = OmegaConf.to_container(compose_cfg("mnist_fwdgrad"), resolve=True)
    bp = OmegaConf.to_container(compose_cfg("mnist_backprop"), resolve=True)
    assert fwd.pop("gradient")["_target_"] == "fwdgrad.ForwardGradient"
    assert bp.pop("gradient")["_target_"] == "fwdgrad.Backprop"
    assert fwd == bp
    assert fwd["dataset"]["_target_"] == "fwdgrad.data.mnist"
    assert fwd["model"]["hidden_sizes"] == [1024, 1024]
    assert fwd["optimization"]["optimizer"]["_target_"] == "torch.optim.SGD"


def test_seed_reaches_the_tangents_and_overrides_compose():
    cfg = compose_cfg("mnist_fwdgrad", [
        "seed=7", "gradient.num_tangents=16", "gradient.aggregation=projection", "gradient.distribution=rademacher",
        "dataset.batch_size=1024", "optimization.learning_rate=5e-4",
    ])
    est = instantiate(cfg.gradient)
    assert est.describe() == {"estimator": "ForwardGradient", "num_tangents": 16, "aggregation": "projection",
                              "distribution": "rademacher", "seed": 7}
    assert instantiate(cfg.optimization.optimizer)([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"] == 5e-4

