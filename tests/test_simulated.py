"""The simulated forward gradient (frog's simfg: d = B^T grad f from a backprop gradient) gives the forward-mode
estimates up to rounding: for every registered aggregation and tangent distribution, over several training steps
from the same seed, on a small float64 MLP; and through the real config (gradient=forward_simulated)."""

from __future__ import annotations

import pytest
import torch
from estimator_problems import flat, mlp_problem, model_problem
from hydra.utils import instantiate

from fwdgrad import ForwardGradient
from fwdgrad.estimators import AGGREGATIONS, TANGENT_DISTRIBUTIONS, BackendDispatch
from fwdgrad.estimators.backends import simulated_derivatives
from mnist_helpers import TINY, compose_cfg, read_metrics

STEPS, K, LR = 4, 3, 0.05


def _train(backend: str, aggregation: str, distribution: str) -> torch.Tensor:
    """STEPS plain-SGD steps from the same start with the same tangent seed; the final parameter vector."""
    loss_fn, params = mlp_problem(seed=1)
    est = ForwardGradient(K, aggregation, distribution, seed=7, backend=backend)
    scale = 1.0 / sum(t.numel() for t in params.values()) if aggregation == "mean_times_dim" else 1.0
    for _ in range(STEPS):
        _, g = est(loss_fn, params)
        params = {name: p - LR * scale * g[name] for name, p in params.items()}
    return flat(params)


@pytest.mark.parametrize("distribution", list(TANGENT_DISTRIBUTIONS))
@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_simulated_equals_forward_mode_over_several_steps(aggregation, distribution):
    reference = _train("auto", aggregation, distribution)  # the fast engine's forward-mode pass
    torch.testing.assert_close(_train("simulated", aggregation, distribution), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_train("func", aggregation, distribution), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_simulated_derivatives_match_func_jvp_for_the_project_models(kind):
    loss_fn, params = model_problem(kind, dtype=torch.float64)
    est = ForwardGradient(4, "mean", "rank1", seed=3)
    draw = est.draw(params)
    loss_s, d_s = simulated_derivatives(lambda p: loss_fn(p), params, draw.tangents, 4)
    loss_f, d_f = BackendDispatch("func")(lambda p: loss_fn(p), params, draw.tangents, 4, est.memory)
    torch.testing.assert_close(loss_s, loss_f)
    torch.testing.assert_close(d_s, d_f, rtol=1e-10, atol=1e-12)


def test_simulated_is_reported_and_keeps_the_tangents():
    est = ForwardGradient(2, backend="simulated")
    assert est.describe()["backend"] == "simulated"
    assert not est.dispatch.uses_fast  # no regenerated tangents: nothing runs the engine


def test_forward_simulated_config_trains_like_forward(tmp_path):
    from fwdgrad.experiments.training import train

    metrics = {}
    for name in ("forward", "forward_simulated"):
        cfg = compose_cfg("mnist_fwdgrad", [*TINY, f"gradient={name}", "gradient.num_tangents=2",
                                            "model=logreg", "optimization.max_steps=6"])
        train(cfg, tmp_path / name)
        metrics[name] = read_metrics(tmp_path / name)
    assert metrics["forward_simulated"]["estimator"]["backend"] == "simulated"
    assert metrics["forward_simulated"]["final_train_loss"] == pytest.approx(metrics["forward"]["final_train_loss"],
                                                                             rel=1e-4)
    assert isinstance(instantiate(compose_cfg("global_optim", ["gradient=forward_simulated"]).gradient),
                      ForwardGradient)


def test_bench_has_simulated_rows():
    import fwdgrad.perf.bench as bench

    args = bench.parse_args(["--quick"])
    labels = [v.label for v in bench.variants([1], ["normal"], [], sim_ks=bench.int_list(args.simulated_ks, "simulated-ks"))]
    assert "fg normal k=2 (simulated: backprop, then B^T g)" in labels
    assert bench.parse_args([]).simulated_ks == "16"
