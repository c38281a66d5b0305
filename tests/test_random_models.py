"""Every estimator on generated models: exact at a full basis, or a refusal that names the problem.

A seeded generator builds small networks from the constructions the correctness issue found FG-A getting wrong
(a layer called twice, tied weights, a weight used by ``F.linear`` outside its layer, a pre-activation reused by
a skip path, batch norm in training mode, centring by the batch mean) mixed with those it must handle (residual
sums, per-example normalisation, dropout, in-place ReLU, views, batch norm in eval mode). For every model:

* FG-A with a full activity basis (the projection onto as many random tangents as there are perturbed units,
  a basis almost surely) equals backprop's gradient, or refuses with a ConfigError before the first step; a
  model with a bad construction must be refused, a model without one must not be;
* FG-W with the projection onto n tangents equals backprop's gradient (it has no precondition on the model), and
  so does zeroth order up to its finite-difference term; local-gradient guesses refuse (no local blocks);
* the global random state after each step is where backprop's step leaves it (one random stream per step).
"""

from __future__ import annotations

import random
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad import Backprop, ForwardActivity, ForwardGradient, LocalGuess, ZerothOrder, estimate_module_grads
from fwdgrad.errors import ConfigError
from fwdgrad.nn.functional import per_example_cross_entropy

DT = torch.float64
WIDTH = 4
GOOD = ["plain", "residual", "layernorm", "dropout", "inplace_relu", "view", "batchnorm_eval"]
BAD = ["called_twice", "tied", "functional_weight", "reused_preactivation", "batchnorm_train", "batch_centring"]


class Block(nn.Module):
    def __init__(self, kind: str, rng: random.Random) -> None:
        super().__init__()
        self.kind = kind
        self.seq = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(inplace=kind == "inplace_relu"))
        if kind == "tied":
            self.twin = nn.Linear(WIDTH, WIDTH)
            self.twin.weight = self.seq[0].weight
        if kind == "functional_weight":
            self.other = nn.Linear(WIDTH, WIDTH)
        if kind == "dropout":
            self.drop = nn.Dropout(0.3)
        if kind.startswith("batchnorm"):
            self.norm = nn.BatchNorm1d(WIDTH, affine=False)
            if kind == "batchnorm_eval":
                self.norm.running_mean.uniform_(-0.5, 0.5)
        self.scale = rng.uniform(0.5, 1.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "called_twice":
            return self.seq(self.seq(h))
        if kind == "reused_preactivation":
            z = self.seq[0](h)
            return self.seq[1](z) + 0.5 * z
        out = self.seq(h)
        if kind == "residual":
            out = h + out
        elif kind == "tied":
            out = self.twin(out)
        elif kind == "functional_weight":
            out = self.other(out) + F.linear(h, self.other.weight)
        elif kind == "layernorm":
            out = F.layer_norm(out, (WIDTH,))
        elif kind == "dropout":
            out = self.drop(out)
        elif kind == "view":
            out = out.reshape(-1, 2, WIDTH // 2).transpose(1, 2).reshape(-1, WIDTH)
        elif kind.startswith("batchnorm"):
            out = self.norm(out)
        elif kind == "batch_centring":
            out = out - out.mean(0, keepdim=True)
        return out * self.scale


class RandomNet(nn.Module):
    def __init__(self, kinds: List[str], seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.inp = nn.Linear(3, WIDTH)
        self.blocks = nn.ModuleList([Block(k, rng) for k in kinds])
        self.out = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def generate(seed: int) -> Tuple[RandomNet, List[str]]:
    rng = random.Random(seed)
    kinds = [rng.choice(GOOD + BAD if rng.random() < 0.5 else GOOD) for _ in range(rng.randint(1, 3))]
    torch.manual_seed(seed)
    model = RandomNet(kinds, seed).to(DT).train()
    for b in model.blocks:  # batch norm in eval mode is per example
        if b.kind == "batchnorm_eval":
            b.norm.eval()
    return model, kinds


def _grads(model, est, x, y, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y), x)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, torch.get_rng_state()


def _kink_distance(model: RandomNet, x: torch.Tensor, seed: int) -> float:
    """The smallest |input| of any ReLU in one forward pass (with the step's dropout masks)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(float(a[0].abs().min())))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    torch.manual_seed(seed)
    with torch.no_grad():
        torch.func.functional_call(model, {n: b.clone() for n, b in model.named_buffers()}, (x,))
    for h in hooks:
        h.remove()
    return min(seen, default=float("inf"))


def _units(model: RandomNet) -> int:
    """Perturbed units per example: every linear layer's outputs but the output layer's (each call counts)."""
    return sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear)) - 3


def check_model(seed: int) -> str:
    model, kinds = generate(seed)
    x = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(seed))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(seed + 1))
    ref, state_bp = _grads(model, Backprop(), x, y, seed)
    n = sum(p.numel() for p in model.parameters())
    got, state = _grads(model, ForwardGradient(n, "projection", seed=1), x, y, seed)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-8, msg=lambda m: f"FG-W {kinds}: {k}: {m}")
    assert torch.equal(state, state_bp), f"FG-W {kinds}: the step's random stream"
    # zeroth order at k = n: backprop's gradient up to the central difference's terms (float64, eps = 1e-8:
    # truncation ~ eps^2, rounding ~ 1e-16 / eps), unless a ReLU input lies within reach of a kink (then the two
    # sides of the difference see different slopes: the difference is right about the values, not a derivative)
    # (every fourth model: its 2n + 1 passes cost more than the rest of the check)
    if seed % 4 == 0 and _kink_distance(model, x, seed) > 1e-5:
        got, state = _grads(model, ZerothOrder(n, 1e-8, aggregation="projection", seed=3), x, y, seed)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"ZO {kinds}: {k}: {m}")
        assert torch.equal(state, state_bp), f"ZO {kinds}: the step's random stream"
    with pytest.raises(ConfigError, match="local_losses"):  # guesses need a model's local blocks
        _grads(model, LocalGuess(), x, y, seed)
    bad = [k for k in kinds if k in BAD]
    try:
        got, state = _grads(model, ForwardActivity(num_tangents=_units(model), aggregation="projection", seed=2),
                            x, y, seed)
    except ConfigError as err:
        assert bad, f"FG-A refused a model with no bad construction {kinds}: {err}"
        assert "\n" not in str(err) and ("gradient=forward" in str(err) or "gradient=backprop" in str(err))
        return "refused"
    assert not bad, f"FG-A accepted {kinds}, which it cannot estimate exactly"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-8, msg=lambda m: f"FG-A {kinds}: {k}: {m}")
    assert torch.equal(state, state_bp), f"FG-A {kinds}: the step's random stream"
    return "exact"


@pytest.mark.parametrize("chunk", range(10))
def test_generated_models_are_exact_or_refused(chunk):
    outcomes = [check_model(seed) for seed in range(chunk * 20, chunk * 20 + 20)]
    assert set(outcomes) <= {"exact", "refused"}


def test_the_generator_covers_every_construction():
    seen = {k for seed in range(200) for k in generate(seed)[1]}
    assert seen == set(GOOD + BAD)


@pytest.mark.slow
def test_many_more_generated_models_are_exact_or_refused():
    for seed in range(200, 350):
        check_model(seed)
