"""The estimator interface's shared pieces: the torch.optim bridge and the parameter helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fwdgrad import Backprop, ForwardGradient, estimate_module_grads
from fwdgrad.estimators import (
    as_param_dict,
    check_scalar_loss,
    cosine_similarity,
    flatten,
    from_param_dict,
    total_numel,
)
from fwdgrad.nn.functional import cross_entropy


def test_module_helper_writes_grads_usable_by_torch_optim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ref = nn.functional.cross_entropy(model(x), y)
    ref.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = estimate_module_grads(Backprop(), model, lambda out: cross_entropy(out, y), x)
    torch.testing.assert_close(loss, ref.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    estimate_module_grads(ForwardGradient(seed=0), model, lambda out: cross_entropy(out, y), x)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_param_dict_round_trip_for_a_tensor_and_a_dict():
    x = torch.arange(3.0)
    d, single = as_param_dict(x)
    assert single and list(d) == [""] and d[""] is x and from_param_dict(d, single) is x
    p = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    d, single = as_param_dict(p)
    assert not single and d == p and d is not p  # a new dict: the caller's is never modified
    assert from_param_dict(d, single) is d
    with pytest.raises(TypeError, match="params must be a Tensor or a dict"):
        as_param_dict([x])


def test_flatten_total_numel_and_cosine_over_the_whole_vector():
    p = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([5.0])}
    assert torch.equal(flatten(p), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert total_numel(p) == 5 and total_numel(torch.zeros(3, 4)) == 12
    q = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([1.0])}
    # <p, q> = 1 + 5 = 6, |p| = sqrt(55), |q| = sqrt(2): one cosine over both tensors, not per tensor
    assert cosine_similarity(p, q) == pytest.approx(6 / math.sqrt(55 * 2))
    assert math.isnan(cosine_similarity(torch.zeros(2), torch.ones(2)))


def test_check_scalar_loss():
    check_scalar_loss(torch.tensor(1.0))
    for bad in (torch.ones(2), 1.0):
        with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
            check_scalar_loss(bad)


def test_backprop_gives_zeros_for_unused_parameters():
    _, g = Backprop()(lambda p: (p["used"] ** 2).sum(), {"used": torch.ones(2), "unused": torch.ones(3)})
    assert torch.equal(g["used"], torch.full((2,), 2.0)) and torch.equal(g["unused"], torch.zeros(3))
