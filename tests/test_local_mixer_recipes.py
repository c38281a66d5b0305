"""The LocalMixer recipes (configs/experiment/local_mixer_{mnist,fashion}/): every method file composes with
either entry point into the estimator and local-loss settings its name says, at every size, and a few steps of it
train on offline digits; the table script reads the runs back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fwdgrad.experiments.training import train
from fwdgrad.nn.models import LocalMixer
from mnist_helpers import CONFIGS, TINY, compose_cfg

#: method file -> (estimator class, local_losses, local_detach)
EXPECTED = {"bp": ("Backprop", False, True), "l_bp": ("Backprop", True, False), "lg_bp": ("Backprop", True, True),
            "fg_w": ("ForwardGradient", False, True), "fg_a": ("ForwardActivity", False, True),
            "lg_fg_w": ("ForwardGradient", True, True), "lg_fg_a": ("ForwardActivity", True, True),
            "lg_fg_a_k16": ("ForwardActivity", True, True), "lg_fg_a_k32": ("ForwardActivity", True, True),
            "guess": ("LocalGuess", True, True), "lg_zo": ("ZerothOrder", True, True)}
#: the methods run on MNIST only / Fashion-MNIST only
FASHION_ONLY = {"lg_fg_a_k32"}
SIZES = {"local_mixer_mnist": {"S": (1, 0, 256, 1), "M": (1, 0, 512, 16)},
         "local_mixer_fashion": {"M": (1, 0, 512, 16), "P": (4, 4, 64, 16)}}
RECIPES = [(d.name, p.stem) for d in sorted((CONFIGS / "experiment").glob("local_mixer_*")) for p in
           sorted(d.glob("*.yaml")) if not p.stem.startswith("_")]


def test_every_recipe_file_is_a_known_method():
    assert {m for _, m in RECIPES} <= set(EXPECTED)
    assert {m for d, m in RECIPES if d == "local_mixer_mnist"} == set(EXPECTED) - FASHION_ONLY
    assert {m for d, m in RECIPES if d == "local_mixer_fashion"} >= {"bp", "lg_bp", "fg_a", "lg_fg_a", "lg_fg_a_k16"}


@pytest.mark.parametrize("folder,method", RECIPES)
def test_recipe_composes_into_its_method_at_every_size(folder: str, method: str):
    estimator, local, detach = EXPECTED[method]
    # the recipe sets the estimator: either entry point (one size with the other script)
    cases = [("mnist_fwdgrad", size) for size in SIZES[folder]] + [("mnist_backprop", next(iter(SIZES[folder])))]
    for script, size in cases:
        blocks, patch, channels, groups = SIZES[folder][size]
        cfg = compose_cfg(script, [f"+experiment={folder}/{method}", f"local_mixer.size={size}"])
        est = instantiate(cfg.gradient)
        assert type(est).__name__ == estimator
        assert getattr(est, "num_tangents", 1) == (int(method.rsplit("_k", 1)[1]) if "_k" in method else 1)
        model = instantiate(cfg.model, input_shape=[1, 28, 28], num_classes=10, _convert_="all")
        assert isinstance(model, LocalMixer) and (model.local_losses, model.local_detach) == (local, detach)
        assert (len(model.blocks), model.patch_size % 28, model.channels, model.groups) == (
            blocks, patch, channels, groups)
        lr = cfg.optimization.learning_rate
        assert isinstance(lr, float) and lr > 0 and cfg.optimization.epochs >= 10


@pytest.mark.parametrize("method", ["lg_fg_a", "guess"])
def test_a_recipe_trains_on_digits_and_the_table_reads_it(method: str, tmp_path: Path):
    # digits are 8x8: the patch variant cuts them into 4 patches of 4x4 (P); a few steps, tiny channels
    runs = tmp_path / "runs"
    # two seeds of the recipe; for LG-FG-A also a variant given on the command line, which is a row of its own
    variant = ["gradient.num_tangents=2", "gradient.aggregation=projection"] if method == "lg_fg_a" else []
    for seed, extra in [(0, []), (1, []), *([(2, variant)] if variant else [])]:
        run = runs / f"{method}_{seed}"
        overrides = [f"+experiment=local_mixer_fashion/{method}" if method in ("lg_bp", "lg_fg_a")
                     else f"+experiment=local_mixer_mnist/{method}", *TINY, f"seed={seed}",
                     "local_mixer.size=P" if method in ("lg_bp", "lg_fg_a") else "local_mixer.size=M",
                     "model.channels=16", "model.groups=4", "optimization.max_steps=4", *extra]
        cfg = compose_cfg("mnist_fwdgrad", overrides)
        m = train(cfg, run)
        assert m["stopped"] == "max_steps" and 0 <= m["final_train_accuracy"] <= 1
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides) + "\n")
        (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    spec = importlib.util.spec_from_file_location("local_mixer_table", CONFIGS.parent / "scripts/local_mixer_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = table.collect(runs)
    assert sorted(r["method"] for r in rows) == [method, method] + ([f"{method}_k2_projection"] if variant else [])
    if variant:
        assert "| LG-FG-A, k = 2, projection | " in table.results_table(rows)  # not left out of the table
        rows = [r for r in rows if r["method"] == method]
    # a run from before metrics.json recorded the training accuracy: recomputed from model.pt, the same number
    path = runs / f"{method}_0" / "metrics.json"
    recorded = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in recorded.items() if k != "final_train_accuracy"}))
    assert table.train_accuracy_of(path.parent) == pytest.approx(recorded["final_train_accuracy"])
    text = table.results_table(rows)
    want = [100 * (1 - json.loads((runs / f"{method}_{s}" / "metrics.json").read_text())["final_test_accuracy"])
            for s in (0, 1)]
    assert f"{sum(want) / 2:.2f} ± " in text and table.METHODS[method] in text
