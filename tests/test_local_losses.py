"""Models trained with local losses: the blocks are views on the model's own layers, backprop through them
("LG-BP") equals a hand-built reference with detached blocks (in one call and block by block), unit groups
change no target gradient, and local-gradient guesses equal their formula (Fournier et al. 2023)."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from fwdgrad import Backprop, LocalGuess, estimate_module_grads
from fwdgrad.errors import ConfigError
from fwdgrad.nn.functional import cross_entropy, per_example_cross_entropy
from fwdgrad.nn.local_losses import group_logits, head_linear, local_blocks
from fwdgrad.nn.models import MLP, ConvNet

DT = torch.float64


def _data(shape, batch: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, *shape, generator=g, dtype=DT), torch.randint(0, classes, (batch,), generator=g)


def _mlp(groups: int = 1, local: bool = True) -> MLP:
    torch.manual_seed(0)
    return MLP((1, 3, 3), 3, (6, 4), local_losses=local, local_groups=groups).to(DT)


def _conv(groups: int = 1) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet((1, 4, 4), 3, channels=2, hidden_size=4, local_losses=True, local_groups=groups).to(DT)


def _grads(model, est, x, y, per_example: bool = True) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of = (lambda o: per_example_cross_entropy(o, y)) if per_example else (lambda o: cross_entropy(o, y))
    estimate_module_grads(est, model, loss_of, x)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _autograd(model, total) -> Dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(total, [p for _, p in model.named_parameters()], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(names, grads,
                                                                              model.parameters())}


def _mlp_reference(model: MLP, x, y) -> Dict[str, torch.Tensor]:
    """By hand: two blocks, the second one's input detached, each with its own cross-entropy."""
    net, aux = model.net, model.aux_heads[0]
    h1 = F.relu(F.linear(x.flatten(1), net[0].weight, net[0].bias))
    l1 = cross_entropy(F.linear(h1, aux.weight, aux.bias), y)
    h2 = F.relu(F.linear(h1.detach(), net[2].weight, net[2].bias))
    l2 = cross_entropy(F.linear(h2, net[4].weight, net[4].bias), y)
    return _autograd(model, l1 + l2)


def _conv_reference(model: ConvNet, x, y) -> Dict[str, torch.Tensor]:
    """By hand: four conv blocks with spatial-mean heads, then the classifier block; every input detached."""
    f, c, aux = model.features, model.classifier, model.aux_heads
    h, total = x, 0.0
    for (lo, hi), head in zip([(0, 2), (2, 5), (5, 7), (7, 10)], aux):
        for layer in f[lo:hi]:
            h = layer(h)
        total = total + cross_entropy(F.linear(h.mean(dim=(2, 3)), head[1].weight, head[1].bias), y)
        h = h.detach()
    h = F.relu(F.linear(h.flatten(1), c[0].weight, c[0].bias))
    return _autograd(model, total + cross_entropy(F.linear(h, c[2].weight, c[2].bias), y))


class _PerBlockBackprop(Backprop):
    separate_local_losses = True  # exact, but through the block-by-block path random estimators take


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("est", [Backprop, _PerBlockBackprop])
@pytest.mark.parametrize("per_example", [True, False])
def test_local_backprop_equals_a_hand_built_reference(kind, est, per_example):
    model = _mlp() if kind == "mlp" else _conv()
    x, y = _data((1, 3, 3) if kind == "mlp" else (1, 4, 4))
    ref = (_mlp_reference if kind == "mlp" else _conv_reference)(model, x, y)
    got = _grads(model, est(), x, y, per_example)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-12, rtol=1e-10)
    loss = estimate_module_grads(est(), model, lambda o: cross_entropy(o, y), x)
    torch.testing.assert_close(loss, cross_entropy(model(x), y))  # the output layer's loss, as logged


def test_local_blocks_are_views_with_the_models_own_names_and_forward():
    plain, local = _mlp(local=False), _mlp()
    x, _ = _data((1, 3, 3))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in local.named_parameters()
                                                        if not n.startswith("aux_heads")]
    torch.testing.assert_close(plain(x), local(x))  # same initialisation and forward: the heads come after
    h = x
    blocks = local_blocks(local)
    for blk in blocks:
        h = blk.body(h)
    torch.testing.assert_close(blocks[-1].head(h), local(x))
    assert head_linear(blocks[-1].head) is local.net[4]
    assert local_blocks(plain) is None


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_unit_groups_change_no_target_gradient(kind):
    x, y = _data((1, 3, 3) if kind == "mlp" else (1, 4, 4))
    ungrouped = _grads(_mlp() if kind == "mlp" else _conv(), Backprop(), x, y)
    grouped = _grads(_mlp(2) if kind == "mlp" else _conv(2), Backprop(), x, y)
    for n in ungrouped:
        torch.testing.assert_close(grouped[n], ungrouped[n], atol=1e-12, rtol=1e-10)


def test_group_logits_equal_the_logits_and_their_losses_sum_to_the_ungrouped_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3).to(DT)
    h = torch.randn(4, 6, dtype=DT, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1])
    logits = lin(h)
    parts = group_logits(h, logits, lin, 3)
    for lg in parts:
        torch.testing.assert_close(lg, logits)
    grouped = torch.autograd.grad(sum(cross_entropy(lg, y) for lg in parts), [h, *lin.parameters()],
                                  retain_graph=True)
    plain = torch.autograd.grad(cross_entropy(lin(h), y), [h, *lin.parameters()])
    for a, b in zip(grouped, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # and group g's loss reaches only group g's features
    (gh,) = torch.autograd.grad(cross_entropy(parts[1], y), h)
    assert float(gh[:, :2].abs().max()) == 0.0 and float(gh[:, 4:].abs().max()) == 0.0
    assert float(gh[:, 2:4].abs().max()) > 0.0


def test_groups_must_divide_every_block_width():
    with pytest.raises(ConfigError, match="local_groups=3 does not divide the width 4"):
        MLP((1, 3, 3), 3, (6, 4), local_losses=True, local_groups=3)


def _global_grad(model, x, y) -> Dict[str, torch.Tensor]:
    return _autograd(model, cross_entropy(model(x), y))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_guess_equals_its_formula_per_block(kind):
    model = _mlp() if kind == "mlp" else _conv()
    x, y = _data((1, 3, 3) if kind == "mlp" else (1, 4, 4))
    guess = _grads(model, Backprop(), x, y)  # every block's local gradient (LG-BP)
    target = _global_grad(model, x, y)
    got = _grads(model, LocalGuess(), x, y)
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = local_blocks(model)
    projected, live = set(), 0
    for blk in blocks[:-1]:
        body = [names[id(p)] for p in blk.body.parameters()]
        dot = sum(float((target[n] * guess[n]).sum()) for n in body)
        sq = sum(float(guess[n].pow(2).sum()) for n in body)
        live += sq > 0
        for n in body:  # g_j = <grad_j L, G_j> G_j / |G_j|^2 (a zero guess, e.g. a dead block: zero)
            torch.testing.assert_close(got[n], (dot / sq if sq else 0.0) * guess[n], atol=1e-12, rtol=1e-9)
        projected |= set(body)
    assert live >= 1
    for n in set(names.values()) - projected:  # last block and heads: their local gradient
        torch.testing.assert_close(got[n], guess[n], atol=1e-12, rtol=1e-10)
    for n in [names[id(p)] for p in blocks[-1].parameters()]:  # which is the global gradient there
        torch.testing.assert_close(got[n], target[n], atol=1e-12, rtol=1e-10)


def test_guess_equals_its_formula_over_all_parameters():
    model = _mlp()
    x, y = _data((1, 3, 3))
    guess, target = _grads(model, Backprop(), x, y), _global_grad(model, x, y)
    got = _grads(model, LocalGuess(scope="global"), x, y)
    shared = [n for n in guess if not n.startswith("aux_heads")]
    dot = sum(float((target[n] * guess[n]).sum()) for n in shared)
    sq = sum(float(guess[n].pow(2).sum()) for n in shared)
    for n in shared:
        torch.testing.assert_close(got[n], dot / sq * guess[n], atol=1e-12, rtol=1e-9)
    for n in guess:
        if n.startswith("aux_heads"):
            torch.testing.assert_close(got[n], guess[n])


def test_guess_needs_local_losses_and_the_model():
    x, y = _data((1, 3, 3))
    with pytest.raises(ConfigError, match="model.local_losses=true"):
        _grads(_mlp(local=False), LocalGuess(), x, y)
    with pytest.raises(ConfigError, match="estimate_module_grads"):
        LocalGuess()(lambda p: p.sum(), torch.zeros(2))
    with pytest.raises(ConfigError, match="scope"):
        LocalGuess(scope="layer")
