"""Small seeded losses shared by the estimator tests, and the statistical tolerance they use.

Statistical checks allow Z = 4.5 standard errors (two-sided tail 7e-6 per component); each test derives its
standard error from the estimator's variance.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from fwdgrad import Backprop
from fwdgrad.estimators import TangentDistribution, TangentDraw
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.experiments.global_optim.functions import Beale, Rosenbrock
from fwdgrad.nn.models import MLP, ConvNet, LogisticRegression

Z = 4.5
DT = torch.float64


class UnitBasis(TangentDistribution):
    """k >= M tangents e_1..e_M over the concatenated entries of every tangent-shaped tensor, then zeros: with
    ``aggregation="sum"`` a forward gradient is ``sum_i <grad, e_i> e_i``, the gradient itself. ``per_example``:
    the tensors are activities ``(N, *units)`` (activity perturbation) and every example gets the same basis of
    its units; otherwise they are parameters. Register it under a name while a test uses it (tests elsewhere
    run over every registered distribution)."""

    def __init__(self, per_example: bool) -> None:
        self.per_example = per_example

    def draw(self, params, k, ctx):
        shapes = [t.shape[1:] if self.per_example else t.shape for t in params.values()]
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        assert k >= sum(sizes), (k, sizes)
        eye = torch.eye(k, dtype=DT)
        out, start = {}, 0
        for (name, t), shape, m in zip(params.items(), shapes, sizes):
            block = eye[:, start:start + m]
            if self.per_example:
                out[name] = block.reshape(k, 1, *shape).expand(k, *t.shape).contiguous()
            else:
                out[name] = block.reshape(k, *shape).contiguous()
            start += m
        return TangentDraw(out)


def mlp_problem(seed: int = 0):
    """A small MLP (5-7-3, float64) with cross-entropy on random data: (loss_fn(params), params)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    x = torch.randn(11, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (11,), generator=g)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return (lambda p: cross_entropy(functional_call(model, p, (x,)), y)), params


PROBLEMS = {
    "beale": lambda: (Beale(), torch.tensor([1.0, 1.5], dtype=DT)),
    "rosenbrock": lambda: (Rosenbrock(), torch.tensor([-1.5, 2.0], dtype=DT)),
    "rosenbrock6": lambda: (Rosenbrock(dim=6), torch.linspace(-1, 1.5, 6, dtype=DT)),
    "mlp": mlp_problem,
}


def model_problem(kind: str, dtype=torch.float32, batch: int = 6):
    """The project's MLP, conv net or logistic regression on a small random batch: (loss_fn, params)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, shape = MLP((1, 8, 8), 5, (24, 16)), (1, 8, 8)
    elif kind == "convnet":
        model, shape = ConvNet((1, 8, 8), 5, channels=3, hidden_size=12), (1, 8, 8)
    else:
        model, shape = LogisticRegression((3, 4), 4), (3, 4)
    model = model.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (batch,), generator=g)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return (lambda p: cross_entropy(functional_call(model, p, (x,)), y)), params


def as_dict(p):
    return p if isinstance(p, dict) else {"": p}


def flat(p) -> torch.Tensor:
    """The whole parameter vector of a tensor or a dict of tensors."""
    return torch.cat([t.reshape(-1) for t in as_dict(p).values()])


def true_grad(loss_fn, params):
    return Backprop()(loss_fn, params)[1]
