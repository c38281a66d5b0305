"""Approximation quality: the measured cosine similarity against its exact law, exactness at k = n, outputs.

For Gaussian tangents cos^2 between the estimate and the true gradient is Beta-distributed (derivation in
fwdgrad/experiments/quality/analysis.py): Beta(k/2, (n-k)/2) for the projection, Beta(k/2, (n-1)/2) for mean and sum. The mean of M
i.i.d. draws of a quantity with variance s^2 has standard error s / sqrt(M); we allow Z = 4.5 standard errors
(two-sided tail 7e-6 per check) with the exact variances
    Var[cos^2] = alpha beta / ((alpha+beta)^2 (alpha+beta+1))        (projection: k(n-k) / (n^2 (n/2+1)))
    Var[cos]   = E[cos^2] - E[cos]^2.
A companion test shows the same tolerance rejects the wrong law, so the check has power.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from fwdgrad import TANGENT_DISTRIBUTIONS, ForwardGradient
from fwdgrad.errors import ConfigError
from fwdgrad.experiments.quality.theory import cos2_variance, expected_cos2, expected_cosine
from fwdgrad.experiments.quality.analysis import (
    normalise_source,
    approx_quality_table,
    flatten_params,
    gaussian_gradients,
    linear_loss,
    run_approx_quality,
    sample_quality,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
Z = 4.5
M = 400


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Thousands of tiny (n <= 200) estimates: intra-op threads only add synchronisation on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _factory(seed: int = 0):
    return lambda k, agg, dist: ForwardGradient(k, agg, dist, seed=seed)


def _gaussian(n: int) -> torch.Tensor:
    return gaussian_gradients([n], seed=11)[0][1]


def _law_violation(cos: np.ndarray, aggregation: str, n: int, k: int) -> tuple[float, float]:
    """Largest |sample mean - expectation| in standard errors, over cos^2 and cos."""
    e2, e1 = expected_cos2(aggregation, n, k), expected_cosine(aggregation, n, k)
    se2 = math.sqrt(cos2_variance(aggregation, n, k) / len(cos))
    se1 = math.sqrt(max(e2 - e1**2, 0.0) / len(cos))
    return abs((cos**2).mean() - e2) / se2, abs(cos.mean() - e1) / se1


@pytest.mark.parametrize("n,k", [(50, 1), (50, 5), (50, 25), (200, 16)])
def test_measured_cosine_follows_the_gaussian_tangent_law(n, k):
    s = sample_quality(_factory(seed=n + k), _gaussian(n), k, "normal", ["projection", "mean"], M)
    for agg in ("projection", "mean"):
        z2, z1 = _law_violation(s[agg].cosine, agg, n, k)
        assert z2 < Z and z1 < Z, f"{agg} n={n} k={k}: cos^2 off by {z2:.1f} SE, cos by {z1:.1f} SE"


def test_the_law_check_rejects_the_wrong_aggregation():
    # Mean-aggregated draws do not follow the projection's law at k = n/2 (E cos^2 = 25/74, not 1/2).
    n, k = 50, 25
    s = sample_quality(_factory(seed=3), _gaussian(n), k, "normal", ["mean"], M)
    z2, _ = _law_violation(s["mean"].cosine, "projection", n, k)
    assert z2 > Z


def test_projection_variance_formula_matches_the_brief():
    n, k = 1000, 37
    assert cos2_variance("projection", n, k) == pytest.approx(k * (n - k) / (n**2 * (n / 2 + 1)))
    assert expected_cos2("projection", n, k) == pytest.approx(k / n)
    assert expected_cos2("mean", n, k) == pytest.approx(k / (n + k - 1))
    # E[cos] <= sqrt(E[cos^2]) (Jensen) and -> sqrt(k/n) for large k
    assert expected_cosine("projection", n, k) < math.sqrt(k / n)
    assert expected_cosine("projection", 10**6, 10**4) == pytest.approx(0.1, rel=1e-4)


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("shape", ["flat", "layer"])
def test_projection_reaches_cosine_one_at_k_equal_n(dist, shape):
    g = torch.Generator().manual_seed(5)
    if shape == "flat":
        grad = torch.randn(32, generator=g)
    else:  # a weight matrix and a bias: the projection spans the whole concatenated vector
        grad = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g)}
    n = flatten_params(grad).numel()
    s = sample_quality(_factory(seed=1), grad, n, dist, ["projection"], 5)["projection"]
    np.testing.assert_allclose(s.cosine, 1.0, atol=1e-6)
    # |g| = |a| cos is first-order sensitive to float32 rounding amplified by the Gram matrix's condition
    # number (a square Gaussian matrix is ill-conditioned), the cosine only to second order.
    np.testing.assert_allclose(s.norm_ratio, 1.0, atol=1e-3)
    assert expected_cosine("projection", n, n) == pytest.approx(1.0, abs=1e-12)


def test_norm_identities_sum_is_k_times_mean_projection_ratio_is_cosine():
    k = 6
    s = sample_quality(_factory(), _gaussian(40), k, "normal", ["mean", "sum", "projection"], 20)
    np.testing.assert_allclose(s["sum"].cosine, s["mean"].cosine, rtol=1e-6)
    np.testing.assert_allclose(s["sum"].norm_ratio, k * s["mean"].norm_ratio, rtol=1e-5)
    # an orthogonal projection P a has |P a| = |a| cos(P a, a)
    np.testing.assert_allclose(s["projection"].norm_ratio, s["projection"].cosine, rtol=1e-5)


@pytest.mark.parametrize("dist", sorted(TANGENT_DISTRIBUTIONS))
def test_shared_tangents_give_exactly_what_calling_each_estimator_gives(dist):
    # sample_quality draws tangents once for all aggregations; the result must equal est(loss_fn, params).
    grad = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    aggs, k, draws = ["mean", "sum", "projection"], 3, 4
    s = sample_quality(_factory(seed=9), grad, k, dist, aggs, draws)
    a = flatten_params(grad).double()
    params = {n: torch.zeros_like(t) for n, t in grad.items()}
    for agg in aggs:
        est = ForwardGradient(k, agg, dist, seed=9)
        for m in range(draws):
            g = flatten_params(est(linear_loss(grad), params)[1]).double()
            assert s[agg].cosine[m] == pytest.approx(float(g @ a / (g.norm() * a.norm())), rel=1e-6)
            assert s[agg].norm_ratio[m] == pytest.approx(float(g.norm() / a.norm()), rel=1e-6)


def test_linear_loss_has_the_source_as_its_exact_gradient():
    grad = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    p = {n: torch.randn_like(t).requires_grad_(True) for n, t in grad.items()}
    linear_loss(grad)(p).backward()
    for name in grad:
        torch.testing.assert_close(p[name].grad, grad[name])


def test_gaussian_source_is_not_the_estimator_stream():
    # Seeded like the estimator, the first tangent would equal the gradient and report cosine 1.
    (name, a), = gaussian_gradients([100], seed=0)
    assert name == "gaussian n=100" and a.shape == (100,)
    first_tangent = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert abs(float(torch.nn.functional.cosine_similarity(a, first_tangent, dim=0))) < 0.5
    torch.testing.assert_close(a, gaussian_gradients([100], seed=0)[0][1])


def test_projection_skipped_beyond_n_and_inapplicable_distribution_skipped(monkeypatch, caplog):
    def matrices_only(shape, generator, dtype, device):  # like a structured (rank-1) tangent for 2-D weights
        if len(shape) != 3:
            raise ValueError("this distribution needs 2-D parameter tensors")
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    monkeypatch.setitem(TANGENT_DISTRIBUTIONS, "matrices_only", matrices_only)
    source = [("flat", torch.randn(8)), ("matrix", {"w": torch.randn(3, 4)})]
    df = approx_quality_table(source, _factory(), [1, 8, 16], ["mean", "projection"],
                              ["normal", "matrices_only"], 3)
    flat = df[df["source"] == "flat"]
    assert set(flat["distribution"]) == {"normal"}
    assert "skipping tangent distribution 'matrices_only'" in caplog.text
    assert not ((df["aggregation"] == "projection") & (df["k"] > df["n"])).any()
    assert len(df[(df["source"] == "matrix") & (df["distribution"] == "matrices_only")]) == 2 + 3


# -- the real config -----------------------------------------------------------------------------------------
def _compose(overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name="approx_quality", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "source").glob("*.yaml")))
def test_every_source_config_instantiates(name, request):
    overrides = [f"source={name}"]
    if name == "mnist_mlp":
        root = request.getfixturevalue("mnist_root")  # skips with a reason when ../shared is absent
        overrides += [f"source.dataset.root={root}", "source.hidden_sizes=[16]", "source.train_steps=[0,3]"]
    cfg = _compose(overrides)
    source = normalise_source(instantiate(cfg.source))
    assert source and all(flatten_params(g).numel() >= 1 for _, g in source)


def test_run_writes_csv_and_figures_from_the_shrunk_real_config(tmp_path):
    cfg = _compose()
    with open_dict(cfg):
        cfg.num_samples = 20
        cfg.source.dims = [30]
        cfg.num_tangents = [1, 30, 64]
    metrics = run_approx_quality(cfg, output_dir=tmp_path)
    df = pd.read_csv(tmp_path / "approx_quality.csv")
    # 2 distributions x (mean, sum at 3 k + projection at k = 1, 30; k = 64 > n is skipped)
    assert len(df) == 2 * (3 + 3 + 2) and set(df["distribution"]) == {"normal", "rademacher"}
    for col in ("cos_mean", "cos_std", "cos_q05", "cos_q50", "cos_q95", "ratio_mean", "ratio_std",
                "cos_expected_gaussian", "ratio_rms_expected_gaussian"):
        assert df[col].notna().all(), col
    proj_full = df[(df["aggregation"] == "projection") & (df["k"] == 30)]
    np.testing.assert_allclose(proj_full["cos_mean"], 1.0, atol=1e-6)
    for png in ("cosine_vs_k.png", "norm_ratio_vs_k.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert metrics["cos/gaussian n=30/normal/projection/k=30"] == pytest.approx(1.0, abs=1e-6)


def test_a_non_forward_estimator_is_a_clear_config_error(tmp_path):
    cfg = _compose(["gradient=backprop"])
    with pytest.raises(ConfigError, match="gradient=forward"):
        run_approx_quality(cfg, output_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def _script(tmp_path, *overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(ROOT / "approx_quality.py"), f"hydra.run.dir={tmp_path}", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def test_entry_point_writes_outputs_and_reports_bad_config_without_traceback(tmp_path):
    ok = _script(tmp_path / "ok", "num_samples=3", "source.dims=[12]", "num_tangents=[1,2]")
    assert ok.returncode == 0, ok.stderr
    assert {"approx_quality.csv", "cosine_vs_k.png", "norm_ratio_vs_k.png"} <= {
        p.name for p in (tmp_path / "ok").iterdir()}
    bad = _script(tmp_path / "bad", "num_samples=3", "source.dims=[12]", "distributions=[normall]")
    assert bad.returncode == 2  # a config error
    output = bad.stdout + bad.stderr  # the [ERROR] line goes to the console log (stdout) and the job's log
    assert "unknown tangent distribution 'normall'" in output and "Traceback" not in output
