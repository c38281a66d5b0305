"""Activity-perturbed forward gradients (FG-A, LG-FG-A): unbiasedness with derived bounds, exactness with a full
basis of activity tangents, agreement of the fast engine with torch.func, and the errors of the module-level
interface.

Variance used by the statistical test. For example b, let u be its tangent over the units answering to one loss
row (normal, E[u u^T] = I), delta = dl_b/dz_b restricted to those units (zero where a following ReLU is
inactive), d = <delta, u>. The unit-i estimate d u_i has mean delta_i and

    E[d^2 u_i^2] = sum_l delta_l^2 E[u_l^2 u_i^2] = |delta|^2 + 2 delta_i^2,   Var = |delta|^2 + delta_i^2.

A linear layer's weight estimate is g_W[i, j] = (1/N) sum_b m_bi d_b u_bi x_bj (m: the ReLU mask), a sum over
independent examples, so Var g_W[i, j] = (1/N^2) sum_b m_bi x_bj^2 (|delta_b|^2 + delta_bi^2), and the bias the
same with x_bj = 1. The mean of M estimates has standard error sqrt(Var / M); we allow Z = 4.5 of them per
component, as tests/test_forward_gradient.py does for weight perturbation.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from estimator_problems import DT, Z, UnitBasis

from fwdgrad import Backprop, ForwardActivity, ForwardGradient, estimate_module_grads
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import TANGENT_DISTRIBUTIONS
from fwdgrad.estimators.local import LocalObjective
from fwdgrad.estimators.activity.sites import local_sites, model_sites, probe, trainable_layers
from fwdgrad.nn.functional import per_example_cross_entropy
from fwdgrad.nn.local_losses import local_blocks
from fwdgrad.nn.models import MLP, ConvNet

BASIS = "test_activity_basis"


@pytest.fixture
def activity_basis():
    """The basis, registered only while a test uses it: tests elsewhere run over every registered distribution."""
    TANGENT_DISTRIBUTIONS[BASIS] = UnitBasis(per_example=True)
    yield BASIS
    del TANGENT_DISTRIBUTIONS[BASIS]


@pytest.fixture(autouse=True)
def _one_thread():
    # thousands of tiny steps: one thread avoids the tangent RNG's thread-pool hand-offs (same numbers either way)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(kind: str = "mlp", local: bool = False, groups: int = 1, batch: int = 6):
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP((1, 3, 3), 3, (6, 4), local_losses=local, local_groups=groups)
    else:
        model = ConvNet((1, 4, 4), 3, channels=2, hidden_size=4, local_losses=local, local_groups=groups)
    model = model.to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *((1, 3, 3) if kind == "mlp" else (1, 4, 4)), generator=g, dtype=DT)
    y = torch.randint(0, 3, (batch,), generator=g)
    return model, x, y


def _grads(model, est, x, y) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y), x)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _sites(model, x):
    blocks = local_blocks(model)
    return local_sites(model, blocks) if blocks else model_sites(model, True, probe(model, trainable_layers(model), x)[0])


def _flat(g: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in g.values()])


def _target(model, x, y) -> Dict[str, torch.Tensor]:
    """Backprop's gradient of what FG-A estimates: the loss, or every block's local loss (LG-BP)."""
    return _grads(model, Backprop(), x, y)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("local,groups", [(False, 1), (True, 1), (True, 2)])
def test_full_basis_of_activity_tangents_gives_backprop_exactly(kind, local, groups, activity_basis):
    model, x, y = _problem(kind, local, groups)
    sites = _sites(model, x)
    units = sum(s.module.out_features if isinstance(s.module, torch.nn.Linear) else 0 for s in sites if s.perturbed)
    if kind == "conv":  # conv units: channels x positions of each perturbed layer's output
        shapes = {}
        hooks = [s.module.register_forward_hook(lambda m, a, o, s=s: shapes.__setitem__(s.name, o[0].numel()))
                 for s in sites if s.perturbed]
        model(x)
        [h.remove() for h in hooks]
        units = sum(shapes.values())
    # sum over an orthonormal basis: sum_i <delta, e_i> e_i = delta, per example and per loss row
    got = _grads(model, ForwardActivity(num_tangents=units, aggregation="sum", distribution=activity_basis), x, y)
    ref = _target(model, x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-12, rtol=1e-10)
    # and the projection onto the span of as many random tangents (a basis almost surely)
    got = _grads(model, ForwardActivity(num_tangents=units, aggregation="projection", seed=3), x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-9, rtol=1e-7)


def _deltas(model, x, y):
    """Per perturbed site: (its input x, per-example gradient delta_b = N dL/dz_b of what is estimated, ReLU mask)."""
    blocks = local_blocks(model)
    sites = _sites(model, x)
    seen = {}

    def keep(s, m, a, o):
        o.retain_grad()
        seen[s.name] = (a[0].detach(), o)

    hooks = [s.module.register_forward_hook(lambda m, a, o, s=s: keep(s, m, a, o)) for s in sites if s.perturbed]
    with torch.enable_grad():
        if blocks:
            loss = LocalObjective(model, blocks, lambda o: per_example_cross_entropy(o, y))(x)
        else:
            loss = per_example_cross_entropy(model(x), y).mean()
        loss.backward()
    [h.remove() for h in hooks]
    model.zero_grad(set_to_none=True)
    n = x.shape[0]
    return [(s, seen[s.name][0], seen[s.name][1].grad * n, (seen[s.name][1] > 0).to(DT) if s.relu_after else 1.0)
            for s in sites if s.perturbed]


def _variance(model, x, y) -> Dict[str, torch.Tensor]:
    """Var of every weight/bias component of the perturbed layers (module docstring), linear layers only."""
    deltas = _deltas(model, x, y)
    n = x.shape[0]
    rows: Dict[int, torch.Tensor] = {}
    for s, _, delta, _ in deltas:  # |delta_b|^2 per loss row: over every unit answering to it
        per_group = delta.reshape(n, s.groups, -1).pow(2).sum(-1)
        for g in range(s.groups):
            rows[s.row + g] = rows.get(s.row + g, 0) + per_group[:, g]
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for s, xin, delta, mask in deltas:
        width = delta.shape[1] // s.groups
        r = torch.stack([rows[s.row + g] for g in range(s.groups)], 1).repeat_interleave(width, 1)  # (N, units)
        per_unit = (r + delta.pow(2)) * mask  # (N, units)
        out[names[id(s.module.weight)]] = per_unit.T @ xin.pow(2) / n**2
        out[names[id(s.module.bias)]] = per_unit.sum(0) / n**2
    return out


def _max_z(est, model, x, y, m: int, scale: float = 1.0, var_factor: float = 1.0) -> float:
    """Largest |mean of m estimates - scale * target| / standard error, over every perturbed layer's
    parameters; ``var_factor`` multiplies the single-tangent variance (k independent terms summed: k)."""
    target, var = _target(model, x, y), _variance(model, x, y)
    mean = {n: torch.zeros_like(v) for n, v in var.items()}
    for _ in range(m):
        g = _grads(model, est, x, y)
        for n in mean:
            mean[n] += g[n] / m
    z = [((mean[n] - scale * target[n]).abs() / (var[n] * var_factor / m).clamp_min(1e-30).sqrt()).max()
         for n in var]
    return float(torch.stack(z).max())


@pytest.mark.parametrize("local,groups", [(False, 1), (True, 2)])
def test_activity_estimate_is_unbiased(local, groups):
    model, x, y = _problem("mlp", local, groups)
    assert _max_z(ForwardActivity(seed=11), model, x, y, 1000) < Z  # the power check below uses as many
    # layers without a tangent are exact: the output layer and the local heads
    got, ref = _grads(model, ForwardActivity(seed=4), x, y), _target(model, x, y)
    for n in ref:
        if n.startswith(("net.4", "aux_heads")):
            torch.testing.assert_close(got[n], ref[n], atol=1e-14, rtol=1e-12)


def test_unbiasedness_check_catches_a_biased_estimator():
    # "sum" over k = 2 tangents has expectation 2 x the gradient: the same bound must reject it (the test's power).
    model, x, y = _problem("mlp")
    est = ForwardActivity(num_tangents=2, aggregation="sum", seed=12)
    assert _max_z(est, model, x, y, 1000, var_factor=2.0) > Z
    est = ForwardActivity(num_tangents=2, aggregation="sum", seed=12)
    assert _max_z(est, model, x, y, 1000, scale=2.0, var_factor=2.0) < Z


@pytest.mark.parametrize("local", [False, True])
def test_fast_engine_matches_torch_func(local):
    model, x, y = _problem("conv", local, 2 if local else 1)
    fast = _grads(model, ForwardActivity(num_tangents=3, seed=5, backend="fast"), x, y)
    func_est = ForwardActivity(num_tangents=3, seed=5, backend="func")
    func = _grads(model, func_est, x, y)
    assert not func_est.dispatch.uses_fast
    for n in fast:
        torch.testing.assert_close(fast[n], func[n], atol=1e-10, rtol=1e-8)


def test_same_seed_same_estimate_and_the_loss_is_the_output_layers():
    model, x, y = _problem("mlp", True, 2)
    a, b = _grads(model, ForwardActivity(seed=7), x, y), _grads(model, ForwardActivity(seed=7), x, y)
    assert all(torch.equal(a[n], b[n]) for n in a)
    loss = estimate_module_grads(ForwardActivity(seed=7), model, lambda o: per_example_cross_entropy(o, y), x)
    torch.testing.assert_close(loss, per_example_cross_entropy(model(x), y).mean())


def test_more_tangents_per_example_lower_the_error():
    # E|g - a|^2 falls as 1/k with the mean of k tangents per example (each example's terms independent)
    model, x, y = _problem("mlp")
    a = _flat(_target(model, x, y))
    errs = []
    for k in (1, 16):
        est = ForwardActivity(num_tangents=k, seed=k)
        errs.append(sum(float((_flat(_grads(model, est, x, y)) - a).pow(2).sum()) for _ in range(200)) / 200)
    assert errs[1] < errs[0] / 8  # 1/16 expected; a loose bound on a 200-draw mean


def test_errors_name_the_fix():
    model, x, y = _problem("mlp")
    est = ForwardActivity()
    with pytest.raises(ConfigError, match="estimate_module_grads"):
        est(lambda p: p["w"].sum(), {"w": torch.zeros(2)})
    with pytest.raises(ConfigError, match="one loss per example"):
        estimate_module_grads(est, model, lambda o: per_example_cross_entropy(o, y).mean(), x)
    with pytest.raises(ConfigError, match="rank1"):
        ForwardActivity(distribution="rank1")
    with pytest.raises(ConfigError, match="mean, sum, projection"):
        ForwardActivity(aggregation="median")
    # (a data-parallel wrapper refuses it: test_activity_train.test_module_estimators_refuse_data_parallel_runs)
    norm = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 4), torch.nn.LayerNorm(4),
                               torch.nn.Linear(4, 3)).to(DT)
    with pytest.raises(ConfigError, match="1.weight|2.weight"):
        estimate_module_grads(est, norm, lambda o: per_example_cross_entropy(o, y), x)
    tail = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 3), torch.nn.Tanh()).to(DT)
    with pytest.raises(ConfigError, match="exact_output_layer=false"):
        estimate_module_grads(est, tail, lambda o: per_example_cross_entropy(o, y), x)
    got = _grads(tail, ForwardActivity(exact_output_layer=False, num_tangents=3, aggregation="projection"), x, y)
    for n, g in _target(tail, x, y).items():  # every layer perturbed: 3 units, 3 tangents -> exact
        torch.testing.assert_close(got[n], g, atol=1e-12, rtol=1e-10)


def test_weight_perturbation_follows_the_local_losses_block_by_block():
    # LG-FG-W: each block draws its own tangent v_j and gets its own directional derivative <grad L_j, v_j>, so
    # g_j = <grad L_j, v_j> v_j (a forward gradient of the sum would use sum_j <grad L_j, v_j> for every block).
    model, x, y = _problem("mlp", True)
    ref = _target(model, x, y)  # LG-BP: every block's own local gradient
    got = _grads(model, ForwardGradient(seed=2), x, y)
    twin = ForwardGradient(seed=2)  # same seed: the same tangents, block after block
    names = {id(p): n for n, p in model.named_parameters()}
    for blk in local_blocks(model):
        params = {n: p.detach() for n, p in blk.named_parameters()}
        v = twin.sample_tangents(params)
        d = sum(float((ref[names[id(p)]] * v[n][0]).sum()) for n, p in blk.named_parameters())
        for n, p in blk.named_parameters():
            torch.testing.assert_close(got[names[id(p)]], d * v[n][0], atol=1e-12, rtol=1e-10)


def test_layers_the_forward_never_calls_get_a_zero_gradient():
    # auxiliary heads built but local losses switched off: the loss does not depend on them (as backprop says)
    model, x, y = _problem("mlp", local=True)
    model.local_losses = False
    got = _grads(model, ForwardActivity(num_tangents=10, aggregation="projection", seed=1), x, y)
    ref = _target(model, x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-12, rtol=1e-9)
    assert not got["aux_heads.0.weight"].any()


def test_one_unit_per_group_with_sign_tangents_is_the_local_gradient_exactly():
    # A group of one unit j answers to its own loss, so d = delta_j u_j and the estimate d u_j = delta_j u_j^2,
    # = delta_j for +-1 tangents: LG-FG-A with as many groups as units equals LG-BP (each block has one layer).
    _, x, y = _problem("mlp")
    torch.manual_seed(0)
    model = MLP((1, 3, 3), 3, (4, 4), local_losses=True, local_groups=4).to(DT)
    got = _grads(model, ForwardActivity(distribution="rademacher", seed=3), x, y)
    for n, g in _target(model, x, y).items():
        torch.testing.assert_close(got[n], g, atol=1e-12, rtol=1e-10)
