"""The issue's numbers on real digits: the official MNIST test set from ../shared/data/mnist, split 8,000 train /
2,000 held out (dataset.test_set_split=2000). Skipped when the files are absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwdgrad.experiments.training import train
from mnist_helpers import compose_cfg

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _split(mnist_root: Path) -> list[str]:
    return [f"dataset.root={mnist_root}", "dataset.test_set_split=2000", "progress_bar=false", "log_every=50"]


def test_backprop_default_mlp_reaches_96_percent_in_10_epochs(mnist_root: Path, tmp_path: Path):
    # The default 784-1024-1024-10 MLP. Adam adapts each weight's step size, which on 8,000 examples gets far
    # in 10 epochs where plain SGD at the reference's lr 2e-4 would not; the per-step decay (lr x 0.995 per
    # step, about 4% of the initial lr after the 630 steps) damps the end-of-run oscillation, so the *final*
    # accuracy, not only the best one, is high (96.7% final; without decay 95.4% final, 96.65% best).
    cfg = compose_cfg("mnist_backprop", [*_split(mnist_root), "optimization=adam", "optimization.learning_rate=1e-3",
                                         "optimization.scheduler.gamma=0.995", "dataset.batch_size=128",
                                         "optimization.epochs=10"])
    assert list(cfg.model.hidden_sizes) == [1024, 1024]
    m = train(cfg, tmp_path)
    assert m["epochs_completed"] == 10 and m["dataset_info"]["train_size"] == 8000
    assert m["final_test_accuracy"] >= 0.96


def test_forward_gradient_clearly_learns(mnist_root: Path, tmp_path: Path):
    # Logistic regression (7,850 parameters): a forward gradient's variance grows with the number of parameters
    # (E|g|^2 = (n + 2)|grad f|^2 for one normal tangent), so the smallest model learns most per step. 16
    # tangents averaged cut that variance 16-fold for about twice the cost of one (vmap over tangents), which
    # allows a 10x larger SGD step than k = 1 (lr 1e-3 -> 67% after 10 epochs; k = 16, lr 1e-2 -> 84%).
    cfg = compose_cfg("mnist_fwdgrad", [*_split(mnist_root), "model=logreg", "gradient.num_tangents=16",
                                        "optimization.learning_rate=1e-2", "optimization.epochs=10"])
    m = train(cfg, tmp_path)
    assert m["estimator"]["estimator"] == "ForwardGradient" and m["estimator"]["num_tangents"] == 16
    assert m["final_test_accuracy"] >= 0.75
