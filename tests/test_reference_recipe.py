"""experiment/reference_mnist trains as orobix/fwdgrad's mnist_backprop.py does (docs/reference_recipe.md).

The reference's loop, re-typed from its source (the version of April 2023 whose README gives the recipe): torch's
default ``nn.Linear`` initialisation, ToTensor()'s pixels normalised by ``Normalize((0.1307,), (0.3081,))``, mean
cross-entropy through an explicit softmax, and ``p -= lr_0 exp(-k t) grad`` with the
step count ``t`` running across epochs (k = 1e-4). The composed recipe, shrunk to a narrow MLP and two steps
of its own batch size on the real digits, must end at the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from fwdgrad.experiments.data import iterate_batches
from fwdgrad.experiments.training import train
from mnist_helpers import compose_cfg

WIDTH = 32  #: hidden width of the shrunk model (the recipe's 1024 would only cost time)
STEPS = 2  #: batches of 1024 and 512 (the last one is kept, as the reference keeps it) from 1,536 examples


def _reference_xent(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """orobix/fwdgrad's loss: mean over the batch of -log softmax at the label (softmax with the max shifted)."""
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True)[0])
    p = e / e.sum(dim=-1, keepdim=True)
    return torch.mean(torch.sum(-torch.log(p) * nn.functional.one_hot(t, 10), dim=1))


def test_reference_mnist_takes_the_reference_steps(mnist_root: Path, tmp_path: Path):
    cfg = compose_cfg("mnist_backprop", [
        "+experiment=reference_mnist", f"dataset.root={mnist_root}", "dataset.test_set_split=2000",
        "dataset.limit_train=1536", "dataset.limit_test=100", f"model.hidden_sizes=[{WIDTH},{WIDTH}]",
        f"optimization.max_steps={STEPS}", "progress_bar=false", "plot_misclassified=0", "log_every=1",
    ])
    splits = instantiate(cfg.dataset)
    x, y = splits.train_x, splits.train_y
    # The reference feeds ToTensor()'s pixels normalised with the fixed MNIST constants (MNIST has 0 and 255
    # pixels, so both ends are reached).
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    assert float(x.min()) == pytest.approx(lo) and float(x.max()) == pytest.approx(hi) and splits.batch_size == 1024

    m = train(cfg, tmp_path)
    assert m["steps"] == STEPS
    ours = list(torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"].values())

    # The reference: seeded default initialisation in layer order, then plain SGD with its per-step decay.
    torch.manual_seed(cfg.seed)
    ref = nn.Sequential(nn.Linear(784, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    init = [p.detach().clone() for p in ref.parameters()]
    torch.manual_seed(cfg.seed)
    mlp = instantiate(cfg.model, input_shape=[1, 28, 28], num_classes=10, _convert_="all")
    for a, b in zip(mlp.parameters(), init):  # what the run started from: the very same weights
        assert torch.equal(a.detach(), b)
    order = torch.Generator().manual_seed(cfg.seed)  # the batch order is a seeded reshuffle, as the loop's
    for t, (xb, yb) in enumerate(iterate_batches(x, y, 1024, order)):
        ref.zero_grad()
        _reference_xent(ref(xb.flatten(1)), yb).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(5e-4 * math.e ** (-t * 1e-4) * p.grad)
    assert t + 1 == STEPS
    assert len(ours) == len(list(ref.parameters()))
    # The same initialisation exactly; the same updates up to float32 rounding. The updates are 1e-7..1e-5
    # (lr 5e-4 times the gradients), so they are compared as differences from the initial weights: the two
    # losses sum in different orders (relative ~1e-6 in the gradient) and each step rounds the weights (half
    # an ulp, under 2e-9 for |w| <= 1/sqrt(784)). Standardised inputs, a summed loss or another initialisation
    # change the updates by far more than rtol 1e-3 + atol 2e-8.
    for a, b, w0 in zip(ours, ref.parameters(), init):
        torch.testing.assert_close(a - w0, b.detach() - w0, rtol=1e-3, atol=2e-8)
