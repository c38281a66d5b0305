"""frog's Sec. 4.3 figure by approx_quality.py (+experiment=frog_quality/angles): angle tangents in the table with
their angle, the cosine-vs-angle figure, and the projection's invariance to the angle (the span of the tangents does
not depend on it: v_i = cos(t) b + sin(t) w_i spans span(b, w_2, ..., w_k) for every t in (0, 180))."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict

from fwdgrad.experiments.quality.analysis import distribution_options, run_approx_quality
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import FixedAngle
from mnist_helpers import compose_cfg


def _angles_cfg(*overrides: str):
    cfg = compose_cfg("approx_quality", ["+experiment=frog_quality/angles", "num_samples=30", "num_tangents=[4,16]",
                                         *overrides])
    with open_dict(cfg):
        cfg.distributions = [cfg.distributions[0], cfg.distributions[1], cfg.distributions[-1]]  # normal, 15, 90
    return cfg


def test_angle_experiment_writes_the_cosine_vs_angle_figure(tmp_path):
    cfg = _angles_cfg()
    assert cfg.source.dims == [64] and list(cfg.aggregations) == ["mean", "projection"]
    result = run_approx_quality(cfg, output_dir=tmp_path)
    df = pd.read_csv(tmp_path / "approx_quality.csv")
    assert set(df["distribution"]) == {"normal", "angle(angle=15)", "angle(angle=90)"}
    assert sorted(df["angle"].dropna().unique()) == [15.0, 90.0]
    assert df[df.distribution == "normal"]["angle"].isna().all()
    assert (tmp_path / "cosine_vs_angle.png").stat().st_size > 20_000
    assert "cos/gaussian n=64/angle(angle=15)/projection/k=4" in result
    # the projection depends only on the span: the same draws give the same cosines at every angle
    proj = df[(df.aggregation == "projection") & df.angle.notna()].pivot_table(index="k", columns="angle",
                                                                               values="cos_mean")
    np.testing.assert_allclose(proj[15.0], proj[90.0], rtol=1e-9)


def test_distribution_options_by_name_and_object():
    assert distribution_options("normal") == {}
    assert distribution_options("angle") == {"angle": 45.0}
    assert distribution_options(FixedAngle(15)) == {"angle": 15.0}


def test_a_distribution_node_that_is_not_a_distribution_is_a_config_error(tmp_path):
    cfg = _angles_cfg()
    with open_dict(cfg):
        cfg.distributions = [{"_target_": "builtins.dict"}]
    with pytest.raises(ConfigError, match=r"distributions\[0\]"):
        run_approx_quality(cfg, output_dir=tmp_path)
