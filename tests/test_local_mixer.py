"""LocalMixer (Ren et al. 2023) and its block-, patch- and group-wise losses, for every estimator.

A seeded generator draws small LocalMixer configurations (1-3 blocks, one patch or several, channel groups,
patch- and group-wise losses on or off) and every configuration is checked against backprop on a loss written
here from the model's layers (not through fwdgrad's local-loss code):

* LG-BP (``Backprop``, block-wise losses) is the gradient of ``sum_j CE(aux_j(mean_p h_j)) + CE(head(mean_p
  sg(h_last)))`` with every block's input detached; L-BP (``local_detach=false``) the same without the detaches;
* the replicated aggregator: every (patch, group) loss equals the global-pool loss in value, and the sum of the
  P G losses has the global-pool loss's gradient (features, weight and bias);
* LG-FG-A over a basis of each example's perturbed units (summed, and projected per loss row) equals LG-BP:
  this pins the declared structure of which units answer to which loss (a unit left out of a row it reaches
  makes it wrong: a test below breaks the declaration on purpose);
  FG-A on the model without local losses equals BP; LG-FG-W and zeroth order at k = n equal LG-BP;
  local-gradient guesses equal their formula from backprop's global and local gradients;
* with ``local_detach=false`` every estimator but backprop refuses.
"""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from estimator_problems import UnitBasis
from torch import nn

from fwdgrad import Backprop, ForwardActivity, ForwardGradient, LocalGuess, ZerothOrder, estimate_module_grads
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import TANGENT_DISTRIBUTIONS
from fwdgrad.nn.functional import per_example_cross_entropy
from fwdgrad.nn.local_losses import local_blocks, replicated_logits
from fwdgrad.nn.models import LocalMixer
from fwdgrad.nn.models.local_mixer import MixerBlock

DT = torch.float64
CLASSES = 3
BASIS = "test_local_mixer_parameter_basis"  # e_1..e_n over a block's parameters, then zeros
UNITS = "test_local_mixer_unit_basis"  # e_1..e_M over an example's perturbed units


def generate(seed: int, local: bool = True) -> Tuple[LocalMixer, dict]:
    """A random small LocalMixer (float64) and its configuration."""
    rng = random.Random(seed)
    side = rng.choice([4, 8])
    channels = rng.choice([4, 6, 8])
    cfg = dict(num_blocks=rng.randint(1, 3), patch_size=rng.choice([0, 2, side // 2]), channels=channels,
               groups=rng.choice([g for g in (1, 2, 3, 4) if channels % g == 0 and channels // g >= 2]),
               patch_losses=rng.random() < 0.75, group_losses=rng.random() < 0.75)
    torch.manual_seed(seed)
    model = LocalMixer((rng.choice([1, 2]), side, side), CLASSES, local_losses=local, **cfg).to(DT)
    cfg["side"] = side
    return model, cfg


def batch(model: LocalMixer, seed: int, n: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = model.blocks[0][0].in_features // model.patch_size ** 2
    side = int(round((model.num_patches ** 0.5) * model.patch_size))
    return torch.randn(n, c, side, side, generator=g, dtype=DT), torch.randint(0, CLASSES, (n,), generator=g)


def grads(model: nn.Module, est, x, y) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y), x)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_local_grads(model: LocalMixer, x, y, detach: bool = True) -> Dict[str, torch.Tensor]:
    """Backprop on the local losses written from the model's layers: LG-BP (``detach``) or L-BP."""
    h, total = model.patchify(x), 0.0
    for j, blk in enumerate(model.blocks):
        h = blk(h.detach() if detach or j == 0 else h)
        total = total + F.cross_entropy(model.aux_heads[j](h.mean(1)), y)
    total = total + F.cross_entropy(model.head(h.detach().mean(1)), y)  # the readout
    names = [n for n, p in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(total, list(model.parameters()))))


def global_grads(model: nn.Module, x, y) -> Dict[str, torch.Tensor]:
    """Backprop on the global loss ``CE(model(x))``, nothing detached (the auxiliary heads get zero)."""
    loss = F.cross_entropy(model(x), y)
    out = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(model.named_parameters(), out)}


def units(model: LocalMixer) -> int:
    """Perturbed units per example: P D for each layer of the blocks (two in the first, three in the others)."""
    return model.num_patches * model.channels * (2 + 3 * (len(model.blocks) - 1))


def close(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], what: str, rtol=1e-6, atol=1e-9) -> None:
    assert set(got) == set(ref), what
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {n}: {m}")


def relu_margin(model: LocalMixer, x) -> float:
    """The smallest |input| of any ReLU (modules, and the residual blocks' own) in one forward pass."""
    seen: List[float] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(float(a[0].abs().min())))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    hooks += [m.register_forward_pre_hook(lambda mod, a: seen.append(float((mod.mlp(a[0]) + a[0]).abs().min())))
              for m in model.modules() if isinstance(m, MixerBlock)]
    with torch.no_grad():
        model(x)
    for hk in hooks:
        hk.remove()
    return min(seen)


@pytest.fixture(autouse=True)
def bases():
    """Registered only while this module's tests run (tests elsewhere run over every registered distribution)."""
    TANGENT_DISTRIBUTIONS[BASIS] = UnitBasis(per_example=False)
    TANGENT_DISTRIBUTIONS[UNITS] = UnitBasis(per_example=True)
    yield
    del TANGENT_DISTRIBUTIONS[BASIS], TANGENT_DISTRIBUTIONS[UNITS]


def check_local(seed: int) -> None:
    model, cfg = generate(seed)
    x, y = batch(model, seed)
    ref = reference_local_grads(model, x, y)
    close(grads(model, Backprop(), x, y), ref, f"LG-BP {cfg}")
    k = units(model)
    for aggregation in ("sum", "projection"):  # sum over a basis; the projection onto the basis's span per row
        close(grads(model, ForwardActivity(num_tangents=k, aggregation=aggregation, distribution=UNITS), x, y),
              ref, f"LG-FG-A {aggregation} k={k} {cfg}")
    n = max(sum(p.numel() for p in blk.parameters()) for blk in local_blocks(model))
    close(grads(model, ForwardGradient(n, "sum", distribution=BASIS), x, y), ref, f"LG-FG-W k={n} {cfg}")
    if seed % 5 == 0 and relu_margin(model, x) > 1e-4:  # (2n + 1 passes a block: every fifth configuration)
        close(grads(model, ZerothOrder(n, 1e-7, distribution=BASIS, aggregation="sum"), x, y), ref,
              f"LG-ZO k={n} {cfg}", rtol=1e-4, atol=1e-6)
    # guesses: every mixer block's local gradient G_j, scaled by <grad_j L, G_j> / |G_j|^2 of the global loss
    glob = global_grads(model, x, y)
    want = dict(ref)
    for j, blk in enumerate(model.blocks):
        keys = [f"blocks.{j}.{n}" for n, _ in blk.named_parameters()]
        dot = sum(float((glob[key] * ref[key]).sum()) for key in keys)
        sq = sum(float(ref[key].pow(2).sum()) for key in keys)
        assert sq > 0, f"a dead block in the generated model {cfg}"
        for key in keys:
            want[key] = ref[key] * (dot / sq)
    close(grads(model, LocalGuess(), x, y), want, f"guesses {cfg}")


@pytest.mark.parametrize("chunk", range(4))
def test_generated_local_mixers_every_estimator_follows_the_local_losses(chunk):
    for seed in range(chunk * 6, chunk * 6 + 6):
        check_local(seed)


@pytest.mark.slow
def test_many_more_generated_local_mixers():
    for seed in range(24, 36):
        check_local(seed)


@pytest.mark.parametrize("seed", range(8))
def test_without_local_losses_fg_a_and_fg_w_at_a_full_basis_are_backprop(seed):
    model, cfg = generate(seed, local=False)
    x, y = batch(model, seed)
    ref = global_grads(model, x, y)
    close(grads(model, Backprop(), x, y), ref, f"BP {cfg}")
    close(grads(model, ForwardActivity(num_tangents=units(model), aggregation="sum", distribution=UNITS), x, y), ref,
          f"FG-A {cfg}")
    n = sum(p.numel() for p in model.parameters())
    close(grads(model, ForwardGradient(n, "projection", seed=seed), x, y), ref, f"FG-W {cfg}")


def test_generator_covers_the_structures():
    cfgs = [generate(seed)[1] for seed in range(24)]
    assert {c["num_blocks"] for c in cfgs} == {1, 2, 3}
    assert any(c["patch_size"] and c["groups"] > 1 and c["patch_losses"] and c["group_losses"] for c in cfgs)
    assert any(not c["patch_losses"] for c in cfgs) and any(not c["group_losses"] for c in cfgs)
    assert any(c["patch_size"] == 0 for c in cfgs)


@pytest.mark.parametrize("seed", range(4))
def test_l_bp_is_backprop_of_the_local_losses_end_to_end_and_the_others_refuse(seed):
    model, cfg = generate(seed + 100)
    model.local_detach = False
    x, y = batch(model, seed)
    close(grads(model, Backprop(), x, y), reference_local_grads(model, x, y, detach=False), f"L-BP {cfg}")
    for est in (ForwardActivity(), ForwardGradient(), LocalGuess(), ZerothOrder()):
        if len(model.blocks) == 1:
            break  # one block: nothing to detach, L-BP is LG-BP
        with pytest.raises(ConfigError, match="local_detach"):
            grads(model, est, x, y)


@pytest.mark.parametrize("patchwise", [True, False])
def test_replicated_aggregator_rows_equal_the_global_pool_loss_and_sum_to_its_gradient(patchwise):
    g = torch.Generator().manual_seed(0)
    n, p, d, groups, c = 5, 4, 6, 3, 3
    h = torch.randn(n, p, d, generator=g, dtype=DT, requires_grad=True)
    head = nn.Linear(d, c).to(DT)
    y = torch.randint(0, c, (n,), generator=g)
    logits = head(h.mean(1))
    rows = replicated_logits(h, logits, head, groups, patchwise)
    assert rows.shape == ((p if patchwise else 1) * groups, n, c)
    torch.testing.assert_close(rows, logits.expand_as(rows), rtol=0, atol=1e-15)
    params = [h, head.weight, head.bias]
    want = torch.autograd.grad(F.cross_entropy(logits, y), params, retain_graph=True)
    got = torch.autograd.grad(sum(F.cross_entropy(r, y) for r in rows), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_wrong_declaration_of_which_losses_a_layer_answers_to_is_caught_by_the_basis_check(monkeypatch):
    # Declaring the token-mixing layer "group" (its units reach every group of their patch) leaves those rows'
    # projections without units they depend on: the full-basis estimate is then no longer LG-BP.
    model = LocalMixer((1, 4, 4), CLASSES, num_blocks=2, patch_size=2, channels=4, groups=2,
                       local_losses=True).to(DT)
    x, y = batch(model, 0)
    ref = reference_local_grads(model, x, y)
    real = LocalMixer.local_blocks

    def wrong(self):
        blocks = real(self)
        for blk in blocks:
            if blk.answers:
                blk.answers = tuple((m, "group") for m, _ in blk.answers)
        return blocks

    monkeypatch.setattr(LocalMixer, "local_blocks", wrong)
    got = grads(model, ForwardActivity(num_tangents=units(model), aggregation="sum", distribution=UNITS), x, y)
    assert max(float((got[n] - ref[n]).abs().max()) for n in ref) > 1e-7


def test_parameter_counts_are_the_papers():
    # Table 2 of Ren et al.: S/1/1 272K, M/1/16 429K (MNIST), with an auxiliary head per block and the classifier
    s = LocalMixer((1, 28, 28), 10, channels=256, groups=1, local_losses=True)
    m = LocalMixer((1, 28, 28), 10, channels=512, groups=16, local_losses=True)
    assert round(sum(p.numel() for p in s.parameters()) / 1000) == 272
    assert round(sum(p.numel() for p in m.parameters()) / 1000) == 429


def test_bad_shapes_are_refused_with_the_fix():
    for kwargs, words in [(dict(patch_size=5), "patch_size=5 must divide"), (dict(groups=3), "groups=3"), (dict(channels=8, groups=8), "at least 2"),
                          (dict(num_blocks=0), "num_blocks")]:
        with pytest.raises(ConfigError, match=words):
            LocalMixer((1, 28, 28), 10, **kwargs)
    with pytest.raises(ConfigError, match="image data"):
        LocalMixer((10,), 3)


def test_fast_engine_and_torch_func_agree_on_a_local_mixer():
    model, _ = generate(3, local=False)
    x, y = batch(model, 3)
    fast = grads(model, ForwardGradient(4, seed=5, backend="fast"), x, y)
    func = grads(model, ForwardGradient(4, seed=5, backend="func"), x, y)
    close(fast, func, "fast vs torch.func", rtol=1e-10, atol=1e-12)


def test_fg_a_elsewhere_handles_layer_norm_and_grouped_layers_exactly_or_refuses():
    # Outside LocalMixer: a norm without parameters after a linear layer and a grouped convolution are estimated
    # exactly (the perturbation sits at the layer's output, the norm is downstream; conv2d_weight takes the groups);
    # a norm with learned scale and shift has parameters no site owns: refused before the first step.
    torch.manual_seed(0)
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    y = torch.randint(0, CLASSES, (4,))
    exact = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6),
                          nn.LayerNorm(6, elementwise_affine=False), nn.ReLU(), nn.Linear(6, CLASSES)).to(DT)
    got = grads(exact, ForwardActivity(num_tangents=64 + 6, aggregation="sum", distribution=UNITS), x, y)
    close(got, global_grads(exact, x, y), "grouped conv + parameter-free layer norm")
    affine = nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, CLASSES)).to(DT)
    with pytest.raises(ConfigError, match="LayerNorm|belongs to another module"):
        grads(affine, ForwardActivity(), x, y)
